//! Compiles the protos under ../../proto into Rust with tonic-prost-build.
//!
//! protoc comes from `$PROTOC`, which `.cargo/config.toml` points at
//! `tools/protoc`: a wrapper that runs the binary of the protoc-bin-vendored
//! crate (a build dependency, so cargo has unpacked it), so a fresh machine
//! needs no apt step.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the vendored crate linked so cargo always unpacks it.
    let _ = protoc_bin_vendored::protoc_bin_path;
    // Read at run time, not baked in with env!(): the target dir is shared
    // between clones (CI reuses the developers' cache), and a build script
    // compiled for another clone must still find this clone's protos.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir).join("../../proto");
    let files = [
        "capstan/pipeline/v1/pipeline.proto",
        "capstan/runner/v1/runner.proto",
        "capstan/api/v1/api.proto",
        "capstan/cluster/v1/cluster.proto",
    ];
    let paths: Vec<_> = files.iter().map(|f| root.join(f)).collect();
    for f in &files {
        // Relative to the package root, so the fingerprint follows the clone.
        println!("cargo:rerun-if-changed=../../proto/{f}");
    }
    tonic_prost_build::configure()
        .bytes(".capstan.runner.v1.LogChunk.data")
        .bytes(".capstan.api.v1.LogData.data")
        .compile_protos(&paths, &[root])?;
    Ok(())
}
