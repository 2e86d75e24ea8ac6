//! Compiles `proto/kiln/v1/kiln.proto` with the protoc binary vendored in the
//! `protoc-bin-vendored` crate, so no system `protoc` is needed. A `PROTOC` set in the
//! environment wins, for platforms the vendored crate does not cover.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment
        // concurrently.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=proto/kiln/v1/kiln.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/kiln/v1/kiln.proto"], &["proto"])?;
    Ok(())
}
