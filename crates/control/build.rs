//! Compiles `proto/control.proto` (Warden's configuration stream) with protox, a pure-Rust
//! protobuf compiler, so that building Warden needs no `protoc` binary. `bytes` fields become
//! `bytes::Bytes`, so one resource body is shared by every response that carries it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/control.proto");
    let fds = protox::compile(["control.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
