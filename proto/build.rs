fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/shim.proto"], &["proto"])?;
    // guest.proto has no services: framed prost messages over a virtio-console port.
    tonic_prost_build::configure().compile_protos(&["proto/guest.proto"], &["proto"])?;
    Ok(())
}
