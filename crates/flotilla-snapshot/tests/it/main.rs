//! Integration tests of flotilla-snapshot, in one binary: stores in temporary
//! directories, memory images generated with known page patterns.

// Tests may unwrap: a panic there is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod concurrency;
mod crash;
mod disks;
mod integrity;
mod layers;
mod refs_gc;
mod size;
