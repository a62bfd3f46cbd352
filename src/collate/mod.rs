mod collator;

pub use collator::*;
