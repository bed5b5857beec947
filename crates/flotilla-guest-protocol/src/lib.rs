//! flotilla-guest-protocol
