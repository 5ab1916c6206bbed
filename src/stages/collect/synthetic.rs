//! The `synthetic` source: labelled shapes kiln draws itself from the run's seed, so no
//! download is needed. Each image is memoised by what it is drawn from.

use super::{SyntheticSource, store};
use crate::digest::Digest;
use crate::formats::dataset::Item;
use crate::imaging::synth;
use crate::stages::{StageContext, StageError};

pub(super) fn collect(cx: &StageContext<'_>, source: &SyntheticSource, label: &str, items: &mut Vec<Item>) -> Result<(), StageError> {
    let SyntheticSource { count, size, shapes, noise, .. } = source;
    let shapes: Vec<synth::Shape> =
        if shapes.is_empty() { synth::SHAPES.to_vec() } else { shapes.iter().filter_map(|s| synth::Shape::parse(s)).collect() };
    let keys: Vec<Digest> = (0..*count)
        .map(|i| Digest::of_bytes(format!("synthetic v1 seed={} i={i} size={size} noise={noise} shapes={shapes:?}", cx.seed).as_bytes()))
        .collect();
    let stored = store::memoised(cx, "synthetic-png-v1", &keys, |i| synth::item(cx.seed, i as u64, *size, &shapes, *noise).1)?;
    for (i, (digest, bytes)) in stored.into_iter().enumerate() {
        let shape = shapes[i % shapes.len()];
        let mut item = Item::new(format!("{label}/{i:05}"), format!("synthetic:{i}"), digest, bytes);
        (item.format, item.width, item.height) = (Some("png".into()), Some(*size), Some(*size));
        item.label = Some(shape.name().to_string());
        items.push(item);
    }
    Ok(())
}
