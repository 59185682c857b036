//! A seeded, self-checking write workload, used by `mirror primary`, `mirror demo` and the tests.
//!
//! Write number `id` goes to slot `slot_of(id)` (slots are `write_size` bytes) and carries a header
//! that names it, so a region can be checked from outside: every slot is either untouched (zeros)
//! or holds exactly one whole write of this workload, and for every write a caller saw complete,
//! its slot holds that write or a later one (ids only grow over a run).

use thiserror::Error;

const MAGIC: u32 = u32::from_le_bytes(*b"WLD1");
/// Smallest write the workload makes (its header).
pub const MIN_WRITE_SIZE: usize = 24;

/// A workload definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    seed: u64,
    write_size: usize,
    slots: u64,
}

/// What a slot of the region holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Never written (all zero).
    Empty,
    /// Holds write `id`, intact.
    Write(u64),
    /// Neither: a torn, foreign or misplaced write.
    Garbage,
}

/// A region that fails the check.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("region check failed: {problems} problem(s); first: {first}")]
pub struct CheckError {
    /// Number of problems found.
    pub problems: usize,
    /// The first one, described.
    pub first: String,
}

/// splitmix64: a well-mixed 64-bit hash, so that consecutive ids scatter over the slots.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Workload {
    /// A workload of `write_size`-byte writes over a region of `region_size` bytes.
    pub fn new(seed: u64, write_size: usize, region_size: u64) -> Result<Self, String> {
        if write_size < MIN_WRITE_SIZE {
            return Err(format!(
                "write size {write_size} is below the workload minimum {MIN_WRITE_SIZE}"
            ));
        }
        let slots = region_size / write_size as u64;
        if slots == 0 {
            return Err(format!(
                "write size {write_size} is larger than the region ({region_size} bytes)"
            ));
        }
        Ok(Workload {
            seed,
            write_size,
            slots,
        })
    }

    /// Bytes per write.
    pub fn write_size(&self) -> usize {
        self.write_size
    }

    /// Number of slots.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// The slot write `id` goes to.
    pub fn slot_of(&self, id: u64) -> u64 {
        mix(self.seed ^ mix(id)) % self.slots
    }

    /// The region offset write `id` goes to.
    pub fn offset_of(&self, id: u64) -> u64 {
        self.slot_of(id) * self.write_size as u64
    }

    /// Fills `buf` (`write_size` bytes) with write `id`.
    pub fn fill(&self, id: u64, buf: &mut [u8]) {
        assert_eq!(
            buf.len(),
            self.write_size,
            "buffer must be write_size bytes"
        );
        buf[8..16].copy_from_slice(&id.to_le_bytes());
        buf[16..24].copy_from_slice(&self.seed.to_le_bytes());
        let mut state = mix(self.seed.wrapping_add(id));
        for chunk in buf[24..].chunks_mut(8) {
            state = mix(state);
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        let crc = mirror_proto::crc::crc32c(&buf[8..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes what slot `slot` of `region` holds.
    pub fn slot(&self, region: &[u8], slot: u64) -> Slot {
        let start = (slot * self.write_size as u64) as usize;
        let Some(bytes) = region.get(start..start + self.write_size) else {
            return Slot::Garbage;
        };
        if bytes.iter().all(|&b| b == 0) {
            return Slot::Empty;
        }
        let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        let id = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        if magic != MAGIC
            || crc != mirror_proto::crc::crc32c(&bytes[8..])
            || self.slot_of(id) != slot
        {
            return Slot::Garbage;
        }
        let mut expect = vec![0u8; self.write_size];
        self.fill(id, &mut expect);
        if expect != bytes {
            return Slot::Garbage;
        }
        Slot::Write(id)
    }

    /// Checks `region`: no slot holds garbage, and for every id in `completed` its slot holds that
    /// write or a later one.
    pub fn check(&self, region: &[u8], completed: &[u64]) -> Result<(), CheckError> {
        let mut problems = Vec::new();
        let mut latest: std::collections::HashMap<u64, u64> = Default::default();
        for &id in completed {
            let s = self.slot_of(id);
            let e = latest.entry(s).or_insert(id);
            *e = (*e).max(id);
        }
        for slot in 0..self.slots {
            match (self.slot(region, slot), latest.get(&slot)) {
                (Slot::Garbage, _) => problems.push(format!("slot {slot} holds garbage")),
                (Slot::Empty, Some(id)) => problems.push(format!(
                    "completed write {id} is missing (slot {slot} empty)"
                )),
                (Slot::Write(found), Some(&id)) if found < id => problems.push(format!(
                    "completed write {id} is missing (slot {slot} holds older write {found})"
                )),
                _ => {}
            }
        }
        match problems.first() {
            None => Ok(()),
            Some(first) => Err(CheckError {
                problems: problems.len(),
                first: first.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_recognised_and_checked() {
        let w = Workload::new(7, 64, 64 * 100).unwrap();
        let mut region = vec![0u8; 64 * 100];
        let mut buf = vec![0u8; 64];
        for id in 0..50 {
            w.fill(id, &mut buf);
            let o = w.offset_of(id) as usize;
            region[o..o + 64].copy_from_slice(&buf);
        }
        let completed: Vec<u64> = (0..50).collect();
        w.check(&region, &completed).unwrap();
        // A completed write that is not there is reported.
        assert!(w.check(&region, &[1000]).is_err());
        // A torn write is garbage.
        let o = w.offset_of(3) as usize;
        region[o + 40] ^= 0xFF;
        let err = w.check(&region, &completed).unwrap_err();
        assert!(err.first.contains("garbage"), "{err}");
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(Workload::new(1, 8, 1024).is_err());
        assert!(Workload::new(1, 4096, 1024).is_err());
    }
}
