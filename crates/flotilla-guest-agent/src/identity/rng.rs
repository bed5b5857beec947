//! Reseeding the kernel RNG, so a clone's random output diverges from its source's.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

use super::{io_step, IdentityError};
use crate::log;

/// `_IOW('R', 0x03, int[2])`, in the asm-generic ioctl encoding (x86, Arm, RISC-V); libc lacks it.
const RNDADDENTROPY: u32 = 0x4008_5203;
/// `_IO('R', 0x07)`.
const RNDRESEEDCRNG: u32 = 0x5207;

/// Mixes `seed` into the kernel's input pool, crediting all its bits, then reseeds the CRNG
/// from the pool so output diverges from the source VM's at once.
pub(super) fn reseed_rng(seed: &[u8]) -> Result<(), IdentityError> {
    let urandom = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(io_step("open /dev/urandom"))?;
    let info = rand_pool_info(seed);
    // SAFETY: `info` is a whole `struct rand_pool_info` whose `buf_size` matches its buffer;
    // the kernel only reads it.
    let added = unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
    if added != 0 {
        return Err(io_step("add the seed to the RNG (RNDADDENTROPY)")(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ENODATA) {
            return Err(io_step("reseed the RNG (RNDRESEEDCRNG)")(error));
        }
        // Not seeded yet: the seed is in the pool and feeds the first seeding.
        log!("RNG not seeded yet; the new seed will be part of its first seeding");
    }
    Ok(())
}

/// `struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }` as words, so it is
/// aligned; the bytes of `buf` are `seed` in order.
fn rand_pool_info(seed: &[u8]) -> Vec<u32> {
    // The seed length is capped far below these limits by validation.
    let bits = i32::try_from(seed.len() * 8).unwrap_or(i32::MAX);
    let size = i32::try_from(seed.len()).unwrap_or(i32::MAX);
    let mut words = vec![bits as u32, size as u32];
    words.extend(seed.chunks(4).map(|chunk| {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        u32::from_ne_bytes(word)
    }));
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_info_carries_the_seed_bytes_in_order() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]);
        assert_eq!(&info[..2], [40, 5]);
        let bytes: Vec<u8> = info[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, [1, 2, 3, 4, 5, 0, 0, 0]);
        // _IOW('R', 0x03, int[2]) and _IO('R', 0x07) in the generic encoding.
        let ioc =
            |dir: u32, nr: u32, size: u32| (dir << 30) | (size << 16) | (u32::from(b'R') << 8) | nr;
        assert_eq!(RNDADDENTROPY, ioc(1, 0x03, 8));
        assert_eq!(RNDRESEEDCRNG, ioc(0, 0x07, 0));
    }
}
