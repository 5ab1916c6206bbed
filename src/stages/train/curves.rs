//! Learning curves as one SVG: loss on the left, accuracy on the right.

use plotters::prelude::*;

use super::EpochRecord;

type Metric = fn(&EpochRecord) -> Option<f64>;

pub fn svg(history: &[EpochRecord], title: &str) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (960, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root.titled(title, ("sans-serif", 18)).map_err(|e| e.to_string())?;
        let (left, right) = root.split_horizontally(480);
        let epochs = history.len().max(2) as f64;
        let series = |f: Metric| -> Vec<(f64, f64)> {
            history.iter().filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.epoch as f64, v))).collect()
        };
        let panels: [(_, &str, [Metric; 2]); 2] = [
            (&left, "loss", [|r| Some(r.train_loss), |r| r.val_loss]),
            (&right, "accuracy", [|r| Some(r.train_accuracy), |r| r.val_accuracy]),
        ];
        for (area, name, [train, val]) in panels {
            let (t, v) = (series(train), series(val));
            let ys = t.iter().chain(&v).map(|p| p.1);
            let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
            let (lo, hi) = if lo.is_finite() { (lo.min(hi - 1e-3), hi) } else { (0.0, 1.0) };
            let pad = (hi - lo) * 0.05;
            let mut chart = ChartBuilder::on(area)
                .margin(12)
                .caption(name, ("sans-serif", 15))
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(1f64..epochs, (lo - pad)..(hi + pad))
                .map_err(|e| e.to_string())?;
            chart.configure_mesh().x_desc("epoch").draw().map_err(|e| e.to_string())?;
            for (points, colour, label) in [(t, BLUE, "train"), (v, RED, "val")] {
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(points, colour.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], colour));
            }
            chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| e.to_string())?;
        }
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}
