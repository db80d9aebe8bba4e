//! Compiles `proto/ablate/v1/*.proto` with the vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    let descriptors = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("ablate_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(descriptors)
        .compile_protos(&["proto/ablate/v1/ablate.proto"], &["proto"])?;
    Ok(())
}
