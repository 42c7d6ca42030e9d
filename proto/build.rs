//! Generates the Rust types for `dialguard/v1/*.proto` with protox, so no
//! system `protoc` is needed. The tonic client and server are generated only
//! with the `grpc` feature, keeping tonic out of the wasm module.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["dialguard/v1/collector.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .compile_fds(descriptors)?;
    Ok(())
}
