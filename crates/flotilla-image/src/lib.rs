//! flotilla-image
