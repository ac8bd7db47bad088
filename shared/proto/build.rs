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
    // Two passes. The first writes the messages and the clients with
    // tonic's prost codec; the second only the servers, with our codec
    // (`codec::ServerCodec`: a request that fails to decode is the caller's
    // INVALID_ARGUMENT, not tonic's INTERNAL), its messages taken from the
    // first pass through `extern_path`. One codec for both sides would make
    // a response the client cannot decode INVALID_ARGUMENT too, which is
    // wrong there (the client's request was fine).
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".capstan.runner.v1.LogChunk.data")
        .bytes(".capstan.api.v1.LogData.data")
        .compile_protos(&paths, std::slice::from_ref(&root))?;
    let servers = out.join("servers");
    std::fs::create_dir_all(&servers)?;
    let mut config = tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&servers)
        .codec_path("crate::codec::ServerCodec");
    for package in ["pipeline", "runner", "api", "cluster"] {
        config = config.extern_path(
            format!(".capstan.{package}.v1"),
            format!("crate::{package}::v1"),
        );
    }
    config.compile_protos(&paths, &[root])?;
    Ok(())
}
