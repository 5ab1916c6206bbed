//! From a decoded image to what a network sees: the preprocess stage's transform, then
//! per-channel normalisation. Training, evaluation and prediction all call this.

use candle_core::{Device, Tensor};
use image::DynamicImage;

use super::Result;
use crate::imaging::transform::{Transform, into_pixels, normalize_chw};

/// One image as normalised CHW floats.
pub fn image_chw(img: &DynamicImage, transform: &Transform, mean: &[f32], std: &[f32]) -> Vec<f32> {
    let out = transform.apply(img);
    let (buf, _) = into_pixels(out, transform.color);
    normalize_chw(&buf, transform.color.channels(), mean, std)
}

/// A batch `[N, C, H, W]` of images.
pub fn batch(images: &[DynamicImage], transform: &Transform, mean: &[f32], std: &[f32], device: &Device) -> Result<Tensor> {
    let mut data = Vec::new();
    for img in images {
        data.extend(image_chw(img, transform, mean, std));
    }
    Tensor::from_vec(data, (images.len(), transform.color.channels(), transform.height as usize, transform.width as usize), device)
}
