//! Generates the KEDA external scaler's gRPC server (proto/externalscaler.proto) with
//! tonic-prost-build, using the protoc that protoc-bin-vendored ships (no system protoc);
//! and names the build's commit for `tidewater --version` (TIDEWATER_COMMIT).

use std::process::Command;

/// The commit being built (`git rev-parse`), and its date; `TIDEWATER_BUILD_COMMIT` wins
/// (a build from a source archive), "unknown" without either.
fn commit() {
    println!("cargo:rerun-if-env-changed=TIDEWATER_BUILD_COMMIT");
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    // Build again when HEAD moves: HEAD itself, and the branch it points at.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{head}");
        }
        println!("cargo:rerun-if-changed={dir}/packed-refs");
    }
    let commit = std::env::var("TIDEWATER_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            let hash = git(&["rev-parse", "--short=12", "HEAD"])?;
            let date = git(&["log", "-1", "--format=%cs", "HEAD"]).unwrap_or_default();
            Some(format!("{hash} {date}").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TIDEWATER_COMMIT={commit}");
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    commit();
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
