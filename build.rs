//! Compiles `proto/` with a pure-Rust protobuf compiler (protox), so a fresh
//! machine needs no system `protoc`. The encoded descriptor set is kept for
//! gRPC server reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/tensorcost/events/v1/events.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("events_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // OTLP traces (src/otlp): the vendored protocol files, a client only.
    let otlp = ["proto/opentelemetry/proto/collector/trace/v1/trace_service.proto"];
    println!("cargo:rerun-if-changed=proto/opentelemetry");
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(protox::compile(otlp, ["proto"])?)?;
    Ok(())
}
