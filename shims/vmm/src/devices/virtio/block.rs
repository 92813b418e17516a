//! virtio-blk on a raw image file: read, write, flush and get-id, served synchronously
//! on the event loop. Every request's sector range is checked against the disk.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tracing::warn;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::queue::{self, Chain, QueueError};
use super::{
    read_config_bytes, types, ActivateError, Activation, Interrupt, VirtioDevice,
    VIRTIO_MMIO_INT_VRING,
};

/// VIRTIO_BLK_F_SEG_MAX.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const SEG_MAX: u32 = 128;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Largest single request we take (a guard against absurd lengths).
const MAX_REQUEST_BYTES: usize = 16 << 20;

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// A disk.
pub struct Block {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; 20],
    active: Option<Active>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("sectors", &self.sectors)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened or sized.
    #[error("disk image: {0}")]
    Io(#[from] std::io::Error),
}

impl Block {
    /// A disk over `file` (its size rounded down to whole sectors), with `id` as its serial.
    pub fn new(file: File, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let len = file.metadata()?.len();
        let mut serial = [0u8; 20];
        let n = id.len().min(20);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file,
            read_only,
            sectors: len / SECTOR_SIZE,
            id: serial,
            active: None,
        })
    }

    /// Serves one request; returns the bytes written into the chain (data + status).
    fn serve(&mut self, chain: &Chain<'_>, mem: &GuestMemoryMmap) -> Result<u32, QueueError> {
        let mut reader = queue::reader(chain, mem)?;
        let mut writer = queue::writer(chain, mem)?;
        if writer.available_bytes() < 1 {
            return Err(QueueError::Malformed("no status byte"));
        }
        let mut hdr = [0u8; 16];
        reader
            .read_exact(&mut hdr)
            .map_err(|_| QueueError::Malformed("short request header"))?;
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
        // The status byte is the last writable byte; data goes before it.
        let data_room = writer.available_bytes() - 1;
        let mut status_writer = writer.split_at(data_room).map_err(QueueError::Chain)?;
        let (status, written) = match kind {
            T_IN => self.read_sectors(sector, data_room, &mut writer),
            T_OUT if self.read_only => (S_IOERR, 0),
            T_OUT => self.write_sectors(sector, &mut reader),
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    warn!(%e, "disk flush failed");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let n = data_room.min(self.id.len());
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => (S_OK, n),
                    Err(_) => (S_IOERR, 0),
                }
            }
            other => {
                warn!(kind = other, "unsupported block request");
                (S_UNSUPP, 0)
            }
        };
        status_writer
            .write_all(&[status])
            .map_err(|_| QueueError::Malformed("status byte not writable"))?;
        Ok(written as u32 + 1)
    }

    fn check_range(&self, sector: u64, len: usize) -> bool {
        (len as u64) & (SECTOR_SIZE - 1) == 0
            && len <= MAX_REQUEST_BYTES
            && sector
                .checked_add(len as u64 / SECTOR_SIZE)
                .is_some_and(|end| end <= self.sectors)
    }

    fn read_sectors(
        &self,
        sector: u64,
        len: usize,
        w: &mut virtio_queue::Writer<'_>,
    ) -> (u8, usize) {
        if !self.check_range(sector, len) {
            warn!(sector, len, sectors = self.sectors, "read outside the disk");
            return (S_IOERR, 0);
        }
        let mut buf = vec![0u8; len];
        if let Err(e) = self.file.read_exact_at(&mut buf, sector * SECTOR_SIZE) {
            warn!(%e, sector, "disk read failed");
            return (S_IOERR, 0);
        }
        match w.write_all(&buf) {
            Ok(()) => (S_OK, len),
            Err(_) => (S_IOERR, 0),
        }
    }

    fn write_sectors(&self, sector: u64, r: &mut virtio_queue::Reader<'_>) -> (u8, usize) {
        let len = r.available_bytes();
        if !self.check_range(sector, len) {
            warn!(
                sector,
                len,
                sectors = self.sectors,
                "write outside the disk"
            );
            return (S_IOERR, 0);
        }
        let mut buf = vec![0u8; len];
        if r.read_exact(&mut buf).is_err() {
            return (S_IOERR, 0);
        }
        match self.file.write_all_at(&buf, sector * SECTOR_SIZE) {
            Ok(()) => (S_OK, 0),
            Err(e) => {
                warn!(%e, sector, "disk write failed");
                (S_IOERR, 0)
            }
        }
    }

    fn process(&mut self) -> Result<(), QueueError> {
        let Some(mut active) = self.active.take() else {
            return Ok(());
        };
        let result = (|| {
            let mem = active.mem.clone();
            let mut used = false;
            while let Some(chain) = queue::pop(&mut active.queue, &mem)? {
                let head = chain.head_index();
                let len = match self.serve(&chain, &mem) {
                    Ok(n) => n,
                    Err(e) => {
                        warn!(%e, "bad block request");
                        0
                    }
                };
                queue::add_used(&mut active.queue, &mem, head, len)?;
                used = true;
            }
            if used {
                active.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
            }
            Ok(())
        })();
        self.active = Some(active);
        result
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        types::BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let queue = a
            .queues
            .into_iter()
            .next()
            .ok_or_else(|| ActivateError::Invalid("no request queue".into()))?;
        self.active = Some(Active {
            mem: a.mem,
            queue,
            interrupt: a.interrupt,
        });
        Ok(())
    }
    fn queue_notify(&mut self, index: usize) {
        if index != 0 {
            warn!(queue = index, "notify of a queue the disk does not have");
            return;
        }
        if let Err(e) = self.process() {
            warn!(%e, "block queue");
        }
    }
    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::{queue_at, TestQueue};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn setup(read_only: bool) -> (GuestMemoryMmap, Block, tempfile::NamedTempFile, TestQueue) {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut img = tempfile::NamedTempFile::new().unwrap();
        let mut data = vec![0u8; 8 * 512];
        data[512..517].copy_from_slice(b"disk!");
        img.write_all(&data).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(img.path())
            .unwrap();
        let mut dev = Block::new(file, read_only, "isola-test").unwrap();
        let tq = TestQueue::new(&m, 0x1000);
        dev.activate(Activation {
            mem: m.clone(),
            queues: vec![queue_at(&m, &tq)],
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            acked_features: 0,
            registrar: Box::new(crate::devices::virtio::mmio::tests::NullRegistrar),
        })
        .unwrap();
        (m, dev, img, tq)
    }

    fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    #[test]
    fn reads_writes_and_rejects_out_of_range() {
        let (m, mut dev, img, tq) = setup(false);
        let q = MockSplitQueue::create(&m, GuestAddress(tq.base), 16);
        // Read sector 1.
        header(&m, 0x4_0000, T_IN, 1);
        // Write sector 2.
        header(&m, 0x4_1000, T_OUT, 2);
        m.write_slice(&[7u8; 512], GuestAddress(0x5_1000)).unwrap();
        // Read past the end of the 8-sector disk.
        header(&m, 0x4_2000, T_IN, 7);
        q.add_desc_chains(
            &[
                d(0x4_0000, 16, F_NEXT, 1),
                d(0x5_0000, 512, F_NEXT | F_WRITE, 2),
                d(0x6_0000, 1, F_WRITE, 0),
                d(0x4_1000, 16, F_NEXT, 4),
                d(0x5_1000, 512, F_NEXT, 5),
                d(0x6_1000, 1, F_WRITE, 0),
                d(0x4_2000, 16, F_NEXT, 7),
                d(0x5_2000, 1024, F_NEXT | F_WRITE, 8),
                d(0x6_2000, 1, F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        dev.queue_notify(0);
        assert_eq!(q.used().idx().load(), 3);
        let mut got = [0u8; 5];
        m.read_slice(&mut got, GuestAddress(0x5_0000)).unwrap();
        assert_eq!(&got, b"disk!");
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x6_0000)).unwrap(), S_OK);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x6_1000)).unwrap(), S_OK);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x6_2000)).unwrap(), S_IOERR);
        let disk = std::fs::read(img.path()).unwrap();
        assert_eq!(&disk[1024..1536], &[7u8; 512]);
    }

    #[test]
    fn read_only_and_malformed_requests() {
        let (m, mut dev, _img, tq) = setup(true);
        assert_ne!(dev.features() & VIRTIO_BLK_F_RO, 0);
        let q = MockSplitQueue::create(&m, GuestAddress(tq.base), 16);
        header(&m, 0x4_0000, T_OUT, 0);
        header(&m, 0x4_1000, 99, 0);
        q.add_desc_chains(
            &[
                d(0x4_0000, 16, F_NEXT, 1),
                d(0x5_0000, 512, F_NEXT, 2),
                d(0x6_0000, 1, F_WRITE, 0),
                // Unknown type.
                d(0x4_1000, 16, F_NEXT, 4),
                d(0x6_1000, 1, F_WRITE, 0),
                // Header only, no status byte.
                d(0x4_1000, 16, 0, 0),
                // A header beyond guest memory.
                d(0xfff0_0000, 16, F_NEXT, 7),
                d(0x6_2000, 1, F_WRITE, 0),
                // A descriptor pointing at itself (a loop).
                d(0x4_1000, 16, F_NEXT, 8),
            ],
            0,
        )
        .unwrap();
        dev.queue_notify(0);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x6_0000)).unwrap(), S_IOERR);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x6_1000)).unwrap(), S_UNSUPP);
        assert_eq!(q.used().idx().load(), 5);
        dev.queue_notify(3);
    }
}
