//! totango-destination: a Segment-compatible destination server for Totango.

pub mod mapping;
pub mod segment;
