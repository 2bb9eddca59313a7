//! Reused buffers for chunk data. Writing a chunk into freshly allocated memory pays a page fault
//! per 4 KiB page (about half a millisecond per MiB on a VM, a third of what a cold read costs
//! beyond the network); buffers given back when their last user drops them are written into again
//! instead. At most [`SPARE_BYTES_MAX`] are kept idle; small buffers are left to the allocator,
//! which reuses them without faults anyway.

use std::sync::Mutex;

use bytes::Bytes;

/// Idle bytes the pool keeps at most.
pub const SPARE_BYTES_MAX: usize = 16 << 20;
/// Buffers smaller than this are neither pooled nor handed out from the pool.
const POOLED_MIN: usize = 64 << 10;
/// Buffers larger than this are freed rather than kept.
const POOLED_MAX: usize = 8 << 20;

/// Idle buffers and their total capacity.
struct Spare {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

/// A pool of idle buffers; the process shares [`POOL`] (tests make their own).
pub struct BufferPool {
    spare: Mutex<Spare>,
}

/// The process-wide pool.
pub static POOL: BufferPool = BufferPool::new();

impl BufferPool {
    pub const fn new() -> BufferPool {
        BufferPool {
            spare: Mutex::new(Spare {
                buffers: Vec::new(),
                bytes: 0,
            }),
        }
    }

    fn spare(&self) -> std::sync::MutexGuard<'_, Spare> {
        crate::sync::lock(&self.spare)
    }

    /// An empty buffer with room for at least `capacity` bytes: the smallest idle one that fits,
    /// or a new one.
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        let mut buffer = self.take_spare(capacity);
        buffer.clear();
        buffer
    }

    /// A buffer of `len` bytes whose contents are unspecified (zeros, or what its last user left):
    /// for callers that overwrite all of it. A pooled buffer is not zeroed again.
    pub fn take_sized(&self, len: usize) -> Vec<u8> {
        let mut buffer = self.take_spare(len);
        if buffer.len() >= len {
            buffer.truncate(len);
        } else {
            buffer.resize(len, 0);
        }
        buffer
    }

    /// The smallest idle buffer with room for `capacity` bytes, still holding what its last
    /// user wrote (its length is how much of it is initialized), or a new empty one.
    fn take_spare(&self, capacity: usize) -> Vec<u8> {
        if capacity >= POOLED_MIN {
            let mut spare = self.spare();
            let best = spare
                .buffers
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= capacity)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            if let Some(i) = best {
                let buffer = spare.buffers.swap_remove(i);
                spare.bytes -= buffer.capacity();
                return buffer;
            }
        }
        Vec::with_capacity(capacity)
    }

    /// Keeps `buffer` for reuse if the pool has room for it.
    pub fn give_back(&self, buffer: Vec<u8>) {
        let capacity = buffer.capacity();
        if !(POOLED_MIN..=POOLED_MAX).contains(&capacity) {
            return;
        }
        let mut spare = self.spare();
        if spare.bytes + capacity <= SPARE_BYTES_MAX {
            // Its length stays: that much is initialized, so take_sized need not zero it again.
            spare.bytes += capacity;
            spare.buffers.push(buffer);
        }
    }

    /// `buffer` as [`Bytes`] that give it back to this pool when the last reference is dropped.
    pub fn into_bytes(&'static self, buffer: Vec<u8>) -> Bytes {
        if buffer.capacity() < POOLED_MIN {
            return Bytes::from(buffer);
        }
        Bytes::from_owner(Returning { buffer, pool: self })
    }
}

impl Default for BufferPool {
    fn default() -> Self {
        BufferPool::new()
    }
}

/// Owns a buffer behind [`Bytes`] and gives it back to its pool on drop.
struct Returning {
    buffer: Vec<u8>,
    pool: &'static BufferPool,
}

impl AsRef<[u8]> for Returning {
    fn as_ref(&self) -> &[u8] {
        &self.buffer
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buffer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_once_their_bytes_are_dropped_and_the_pool_stays_bounded() {
        let pool: &'static BufferPool = Box::leak(Box::new(BufferPool::new()));
        let first = pool.take_sized(1 << 20);
        let address = first.as_ptr();
        let bytes = pool.into_bytes(first);
        let slice = bytes.slice(10..20);
        drop(bytes);
        // Still referenced through the slice: not in the pool yet.
        let other = pool.take(1 << 20);
        assert_ne!(other.as_ptr(), address);
        drop(slice);
        let again = pool.take(1 << 20);
        assert_eq!(again.as_ptr(), address, "the dropped buffer is reused");
        assert!(again.is_empty());
        // A sized buffer has its length, from the pool or new (then zeroed).
        pool.give_back(again);
        let sized = pool.take_sized(300 << 10);
        assert_eq!((sized.as_ptr(), sized.len()), (address, 300 << 10));
        pool.give_back(sized);
        let grown = pool.take_sized(900 << 10);
        assert_eq!((grown.as_ptr(), grown.len()), (address, 900 << 10));
        assert!(grown[300 << 10..].iter().all(|&b| b == 0));
        let fresh = pool.take_sized(3 << 20);
        assert!(fresh.len() == 3 << 20 && fresh.iter().all(|&b| b == 0));
        // The smallest idle buffer that fits is handed out.
        pool.give_back(Vec::with_capacity(4 << 20));
        pool.give_back(Vec::with_capacity(2 << 20));
        assert_eq!(pool.take(1 << 20).capacity(), 2 << 20);
        // Small and huge buffers are not kept; idle bytes never exceed the bound.
        pool.give_back(Vec::with_capacity(1024));
        pool.give_back(Vec::with_capacity(POOLED_MAX + 1));
        for _ in 0..(SPARE_BYTES_MAX >> 20) + 4 {
            pool.give_back(Vec::with_capacity(1 << 20));
        }
        let spare = pool.spare();
        assert!(spare.bytes <= SPARE_BYTES_MAX);
        assert_eq!(
            spare.bytes,
            spare.buffers.iter().map(Vec::capacity).sum::<usize>()
        );
        assert!(spare
            .buffers
            .iter()
            .all(|b| (POOLED_MIN..=POOLED_MAX).contains(&b.capacity())));
    }
}
