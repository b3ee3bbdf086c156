//! Compiles `proto/ext_authz.proto` (Envoy's ext_authz gRPC API, reduced) with protox, a
//! pure-Rust protobuf compiler, so that building Warden needs no `protoc` binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/ext_authz.proto");
    let fds = protox::compile(["ext_authz.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
