//! The kinds kiln ships, registered in one place: the only module that names every kind,
//! so the contract in `stages/mod.rs` stays below them all.

use std::sync::Arc;

use super::{StageRegistry, clean, collect, command, convert, eval, label, label_issues, preprocess, train};

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
        r.register(Arc::new(label_issues::LabelIssuesKind));
        r
    }
}

impl Default for StageRegistry {
    fn default() -> Self {
        Self::builtin()
    }
}
