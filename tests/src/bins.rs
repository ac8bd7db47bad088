//! Where the binaries under test are: next to the test executable's
//! `deps/` directory (`$CARGO_TARGET_DIR/debug/`), beside a binary that
//! uses the harness (`capstan-bench`), or in `$CAPSTAN_BIN_DIR`.

use std::path::PathBuf;

/// Where the binaries are.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CAPSTAN_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("an executable has a directory");
    // A binary beside the others (capstan-bench), or a test in .../debug/deps.
    if dir.join("capstan-coordinator").exists() {
        return dir.to_path_buf();
    }
    dir.parent()
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// The binary `name` in [`bin_dir`]; panics saying how to build it.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins`",
        p.display()
    );
    p
}
