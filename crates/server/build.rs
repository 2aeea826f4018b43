//! Generates the KEDA external scaler's gRPC server (proto/externalscaler.proto) with
//! tonic-prost-build, using the protoc that protoc-bin-vendored ships (no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/externalscaler.proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: the build script is single-threaded; prost-build reads PROTOC from here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .build_client(false)
        .build_transport(false)
        .compile_protos(&["proto/externalscaler.proto"], &["proto"])?;
    Ok(())
}
