//! Which accelerator a training or inference run uses.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Serialize};

/// `device = "auto" | "cpu" | "cuda" | "cuda:N" | "metal"` in a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            "metal" => Ok(DeviceChoice::Metal),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("unknown device `{other}`: expected \"auto\", \"cpu\", \"cuda\", \"cuda:N\" or \"metal\"")),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Metal => f.write_str("metal"),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceChoice {
    /// Resolves `auto` to what this build can use: CUDA, then Metal, then the CPU. Numerics
    /// differ between kinds, so the resolved kind (not `auto`) goes into cache keys.
    pub fn resolve(self) -> DeviceChoice {
        match self {
            DeviceChoice::Auto if candle_core::utils::cuda_is_available() => DeviceChoice::Cuda(0),
            DeviceChoice::Auto if candle_core::utils::metal_is_available() => DeviceChoice::Metal,
            DeviceChoice::Auto => DeviceChoice::Cpu,
            other => other,
        }
    }

    /// `cpu`, `cuda` or `metal`: what changes the numbers (GPU index does not).
    pub fn kind(self) -> &'static str {
        match self.resolve() {
            DeviceChoice::Cuda(_) => "cuda",
            DeviceChoice::Metal => "metal",
            _ => "cpu",
        }
    }

    pub fn open(self) -> Result<Device, candle_core::Error> {
        match self.resolve() {
            DeviceChoice::Cuda(n) => Device::new_cuda(n),
            DeviceChoice::Metal => Device::new_metal(0),
            _ => Ok(Device::Cpu),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        for s in ["auto", "cpu", "cuda:1", "metal"] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        assert!("tpu".parse::<DeviceChoice>().unwrap_err().contains("expected"));
    }

    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    #[test]
    fn auto_is_cpu_without_gpu_features() {
        assert_eq!(DeviceChoice::Auto.kind(), "cpu");
        assert!(DeviceChoice::Auto.open().unwrap().is_cpu());
    }
}
