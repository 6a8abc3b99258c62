//! Generates the gRPC server and client from `proto/` with a vendored `protoc`,
//! so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY of set_var: build scripts are single-threaded.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("recvault_descriptor.bin"))
        .bytes(".recvault.v1")
        .compile_protos(&["proto/recvault/v1/recvault.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
