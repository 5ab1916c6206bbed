//! The kinds kiln ships, registered in one place: the only module that names every kind,
//! so the contract in `stages/mod.rs` stays below them all.

use std::sync::Arc;

use super::{StageRegistry, clean, collect, command, convert, eval, label, preprocess, train};

impl StageRegistry {
    /// Every kind kiln ships.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        r.register(Arc::new(command::CommandKind));
        r.register(Arc::new(collect::CollectKind));
        r.register(Arc::new(clean::CleanKind));
        r.register(Arc::new(label::LabelKind));
        r.register(Arc::new(preprocess::PreprocessKind));
        r.register(Arc::new(convert::ConvertKind));
        r.register(Arc::new(train::TrainKind));
        r.register(Arc::new(eval::EvalKind));
        r
    }
}

impl Default for StageRegistry {
    fn default() -> Self {
        Self::builtin()
    }
}
