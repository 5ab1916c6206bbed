//! Dynamic batching: concurrent requests' images share one forward pass.
//!
//! Handlers prepare images (decode + preprocess) on the blocking pool and put them on a
//! bounded queue; one inference thread owns the model, takes the first waiting image, then
//! gathers more until the batch is full or `max_wait` has passed since the first arrived.
//! A full queue is refused at once (the handler answers 503) rather than letting latency
//! grow without bound.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::stats::ServerStats;
use crate::predict::Predictor;

#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// 1 turns batching off.
    pub max_batch: usize,
    /// How long the first image of a batch may wait for company.
    pub max_wait: Duration,
    /// Images waiting beyond this many are refused.
    pub queue: usize,
}

pub type Reply = Result<Vec<f32>, String>;

pub struct Job {
    pub image: Vec<f32>,
    /// The model the image was prepared for: a reload mid-request must not mix models.
    pub predictor: Arc<Predictor>,
    pub reply: oneshot::Sender<Reply>,
}

/// The handlers' end of the queue.
#[derive(Clone)]
pub struct Batcher {
    tx: SyncSender<Job>,
    stats: Arc<ServerStats>,
}

pub enum Refused {
    /// The queue is full: answer 503.
    Busy,
    /// The inference thread is gone (shutting down).
    Closed,
}

impl Batcher {
    /// Starts the inference thread. It ends when every `Batcher` clone is dropped.
    pub fn start(config: BatchConfig, stats: Arc<ServerStats>) -> (Batcher, std::thread::JoinHandle<()>) {
        let (tx, rx) = sync_channel(config.queue.max(1));
        let worker_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("kiln-inference".into())
            .spawn(move || run(config, rx, worker_stats))
            .expect("spawn the inference thread");
        (Batcher { tx, stats }, handle)
    }

    pub fn submit(&self, image: Vec<f32>, predictor: Arc<Predictor>) -> Result<oneshot::Receiver<Reply>, Refused> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(Job { image, predictor, reply }) {
            Ok(()) => {
                self.stats.queue_depth.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(rx)
            }
            Err(TrySendError::Full(_)) => Err(Refused::Busy),
            Err(TrySendError::Disconnected(_)) => Err(Refused::Closed),
        }
    }
}

fn run(config: BatchConfig, rx: Receiver<Job>, stats: Arc<ServerStats>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + config.max_wait;
        while jobs.len() < config.max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = if left.is_zero() { rx.try_recv().map_err(|_| RecvTimeoutError::Timeout) } else { rx.recv_timeout(left) };
            match next {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        stats.queue_depth.fetch_sub(jobs.len() as i64, std::sync::atomic::Ordering::Relaxed);
        // Normally one group; two only while a reload is under way.
        while !jobs.is_empty() {
            let model = jobs[0].predictor.clone();
            let (group, rest): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|j| Arc::ptr_eq(&j.predictor, &model));
            jobs = rest;
            infer(&model, group, &stats);
        }
    }
}

fn infer(predictor: &Predictor, mut jobs: Vec<Job>, stats: &ServerStats) {
    stats.observe_batch(jobs.len());
    let images: Vec<Vec<f32>> = jobs.iter_mut().map(|j| std::mem::take(&mut j.image)).collect();
    match predictor.probabilities(&images) {
        Ok(probs) => {
            for (job, p) in jobs.into_iter().zip(probs) {
                let _ = job.reply.send(Ok(p));
            }
        }
        Err(e) => {
            tracing::error!("inference failed: {e}");
            for job in jobs {
                let _ = job.reply.send(Err(e.to_string()));
            }
        }
    }
}
