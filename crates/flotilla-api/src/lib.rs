//! flotilla-api
