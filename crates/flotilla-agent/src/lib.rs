//! flotilla-agent
