//! The PVH boot protocol: `hvm_start_info`, its memory map and module list.
//! <https://xenbits.xen.org/docs/unstable/misc/pvh.html>

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// E820 type of usable RAM.
const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
const E820_RESERVED: u32 = 2;

/// Errors writing the PVH structures.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// Guest memory refused a write (too small a guest).
    #[error("writing {what} to guest memory: {source}")]
    Write {
        /// The structure.
        what: &'static str,
        /// The error.
        source: vm_memory::GuestMemoryError,
    },
}

/// Writes `hvm_start_info` with a memory map of `mem_size` bytes of RAM and, if given, the
/// initramfs at (`addr`, `size`) as the one module.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initramfs: Option<(GuestAddress, u64)>,
) -> Result<(), PvhError> {
    let memmap = [
        hvm_memmap_table_entry {
            addr: 0,
            size: EBDA_START,
            type_: E820_RAM,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            type_: E820_RESERVED,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: HIMEM_START,
            size: mem_size - HIMEM_START,
            type_: E820_RAM,
            reserved: 0,
        },
    ];
    for (i, entry) in memmap.iter().enumerate() {
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(*entry, GuestAddress(at))
            .map_err(|source| PvhError::Write {
                what: "PVH memory map",
                source,
            })?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initramfs {
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(|source| PvhError::Write {
                what: "PVH module list",
                source,
            })?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|source| PvhError::Write {
            what: "hvm_start_info",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_magic_memmap_and_module() {
        let size = 4 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        write_start_info(&mem, size as u64, Some((GuestAddress(0x30_0000), 0x1234))).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24))
            .unwrap();
        assert_eq!(last.addr + last.size, size as u64);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x30_0000, 0x1234));
    }
}
