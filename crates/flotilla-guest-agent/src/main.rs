//! flotilla-guest-agent
fn main() {}
