//! flotilla-cli
fn main() {}
