//! flotilla-e2e
