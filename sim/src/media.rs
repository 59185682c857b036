//! Simulated persistent memory: written bytes and durable bytes kept apart.
//!
//! The queue file lives on a real file system (the queue maps it), so its *written* bytes are
//! the file's contents. Its *durable* bytes are an image in memory that changes only when the
//! queue reports a barrier (through its crash hook) for the ranges the barrier covers, whole
//! 64-byte cache lines, as hardware writes back. At a power loss, each 8-byte word whose written
//! value differs from its durable one independently keeps either (the kernel or the CPU may have
//! written any dirty word back, in any order): the file is rewritten with that image before the
//! queue is opened again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use mirror_storage::{CrashEvent, CrashHook};

/// Bytes of a write-back unit that a power loss may tear between (a word: the unit of power-fail
/// atomicity on persistent memory; larger units are coarser versions of the same choice).
pub const TEAR_WORD: usize = 8;
/// Bytes the hardware writes back together.
const LINE: usize = 64;

/// The durable image of one file, updated by the queue's crash hook.
#[derive(Clone)]
pub struct DurableImage {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl DurableImage {
    /// Takes the file's current contents as durable (a file just created or recovered).
    pub fn of_file(path: &Path) -> std::io::Result<DurableImage> {
        Ok(DurableImage {
            bytes: Arc::new(Mutex::new(std::fs::read(path)?)),
        })
    }

    /// A hook for `PersistentQueue::open_with_crash_hook` that copies each barrier's ranges from the
    /// file into this image.
    pub fn hook(&self, path: &Path) -> std::io::Result<CrashHook> {
        let file = File::open(path)?;
        let image = Arc::clone(&self.bytes);
        Ok(Box::new(move |event| {
            if let CrashEvent::Barrier(ranges) = event {
                let mut img = image.lock().unwrap_or_else(PoisonError::into_inner);
                for &(off, len) in ranges {
                    let start = off / LINE * LINE;
                    let end = ((off + len).div_ceil(LINE) * LINE).min(img.len());
                    // The file is the queue's shared mapping: reading it sees what was stored.
                    // A failed read leaves the range as it was, i.e. not durable: the stricter
                    // outcome, and the run's checkers will say if that loses anything.
                    let _ = file.read_exact_at(&mut img[start..end], start as u64);
                }
            }
        }))
    }

    /// A copy of the durable bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// How many words a power loss image took from the written side where the two differed, and
/// how many it left durable.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tear {
    /// Words that differed between written and durable.
    pub dirty_words: u64,
    /// Of those, words that kept the written value.
    pub written_words: u64,
}

/// The image a power loss leaves: `durable`, except that each dirty word independently holds
/// its written value with probability `p_written_percent`.
pub fn power_loss_image(
    written: &[u8],
    durable: &[u8],
    p_written_percent: u32,
    rng: &mut fastrand::Rng,
) -> (Vec<u8>, Tear) {
    assert_eq!(written.len(), durable.len(), "images of different files");
    let mut out = durable.to_vec();
    let mut tear = Tear::default();
    for (i, (w, d)) in written
        .chunks(TEAR_WORD)
        .zip(durable.chunks(TEAR_WORD))
        .enumerate()
    {
        if w != d {
            tear.dirty_words += 1;
            if rng.u32(0..100) < p_written_percent {
                tear.written_words += 1;
                out[i * TEAR_WORD..i * TEAR_WORD + w.len()].copy_from_slice(w);
            }
        }
    }
    (out, tear)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_power_loss_keeps_durable_words_and_tears_only_dirty_ones() {
        let durable = vec![1u8; 64];
        let mut written = durable.clone();
        written[8..16].fill(2);
        written[40..48].fill(3);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen_written = false;
        let mut seen_durable = false;
        for _ in 0..64 {
            let (img, tear) = power_loss_image(&written, &durable, 50, &mut rng);
            assert_eq!(tear.dirty_words, 2);
            for (i, chunk) in img.chunks(8).enumerate() {
                if i == 1 || i == 5 {
                    seen_written |= chunk != [1u8; 8];
                    seen_durable |= chunk == [1u8; 8];
                    assert!(chunk == [1u8; 8] || chunk == &written[i * 8..i * 8 + 8]);
                } else {
                    assert_eq!(chunk, [1u8; 8], "clean word changed");
                }
            }
        }
        assert!(seen_written && seen_durable, "both outcomes happen");
    }
}
