//! Compiles `proto/ca.proto` (Istio's certificate service) with protox, a pure-Rust protobuf
//! compiler, so that building Warden needs no `protoc` binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ca.proto");
    let fds = protox::compile(["ca.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
