//! Writes isola's guest initramfs: `isola-vm-initramfs --init BIN --out FILE
//! [--add HOST_PATH=GUEST_PATH]...`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use isola_vm::initramfs::{guest_initramfs, write_atomic, ExtraFile};

fn main() -> anyhow::Result<()> {
    let mut init = None;
    let mut out = None;
    let mut extra = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--init" => init = Some(PathBuf::from(value()?)),
            "--out" => out = Some(PathBuf::from(value()?)),
            "--add" => {
                let v = value()?;
                let (source, target) = v
                    .split_once('=')
                    .with_context(|| format!("--add {v}: expected HOST_PATH=GUEST_PATH"))?;
                extra.push(ExtraFile {
                    source: source.into(),
                    target: target.into(),
                });
            }
            "-h" | "--help" => {
                println!("usage: isola-vm-initramfs --init BIN --out FILE [--add HOST=GUEST]...");
                return Ok(());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    let init = init.context("--init is required")?;
    let out = out.context("--out is required")?;
    let bytes = guest_initramfs(&init, &extra)?;
    write_atomic(&out, &bytes)?;
    eprintln!(
        "isola-vm-initramfs: wrote {} ({} bytes)",
        out.display(),
        bytes.len()
    );
    Ok(())
}
