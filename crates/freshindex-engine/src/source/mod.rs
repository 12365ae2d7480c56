//! Sources: where items come from and how changes are detected.

pub mod files;
pub mod postgres;
pub mod recent;
pub mod watch;
