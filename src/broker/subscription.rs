//! Subscriptions: the broker's side (a [`Subscriber`] with a bounded
//! buffer) and the consumer's side (a [`Subscription`] stream that replays,
//! then follows, then says why it ended).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio_stream::Stream;

use super::Stats;
use super::dispatch::Unsubscribe;
use super::filter::TypeFilter;
use crate::event::SharedEvent;

/// The broker's handle on one subscriber.
pub(super) struct Subscriber {
    pub(super) id: u64,
    pub(super) filter: TypeFilter,
    pub(super) tx: mpsc::Sender<SharedEvent>,
    pub(super) overflowed: Arc<AtomicBool>,
}

impl Subscriber {
    /// Hands `event` over if it matches. Returns false when this subscriber
    /// must be removed (gone, or too slow).
    pub(super) fn offer(&self, event: &SharedEvent, stats: &Stats) -> bool {
        if !self.filter.matches(&event.event_type) {
            return !self.tx.is_closed();
        }
        match self.tx.try_send(Arc::clone(event)) {
            Ok(()) => {
                stats.delivered.inc();
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.overflowed.store(true, Ordering::Release);
                stats.slow_subscribers_dropped.inc();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

/// What a subscription yields next.
#[derive(Debug, Clone)]
pub enum Delivery {
    Event(SharedEvent),
    /// The subscriber fell more than its buffer behind and was dropped.
    /// `last_id` is the last event it was sent; resume after it.
    Lagged {
        last_id: Option<String>,
    },
    /// The broker is shutting down. `last_id` as for `Lagged`.
    Closed {
        last_id: Option<String>,
    },
    /// The subscription's deadline (its token's expiry) passed.
    Expired {
        last_id: Option<String>,
    },
}

/// A live subscription: the replay, then live events, then at most one
/// `Lagged`, `Closed` or `Expired`, then the end. Dropping it unsubscribes.
pub struct Subscription {
    pub(super) replay: std::vec::IntoIter<SharedEvent>,
    /// `Some` when a resume was asked for: whether the history reached back.
    pub recovered: Option<bool>,
    /// The newest event in the tenant's history when this subscription
    /// started: everything after it arrives live (or in the replay).
    pub history_tail: Option<String>,
    pub(super) rx: mpsc::Receiver<SharedEvent>,
    pub(super) overflowed: Arc<AtomicBool>,
    pub(super) last_sent: Option<SharedEvent>,
    pub(super) finished: bool,
    pub(super) deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    pub(super) _guard: Unsubscribe,
}

impl Subscription {
    /// Events replayed from history before live events.
    pub fn replay_len(&self) -> usize {
        self.replay.len()
    }

    /// Ends the subscription with [`Delivery::Expired`] at `deadline` (the
    /// subscriber's token expiry), replayed events or not.
    pub fn with_deadline(mut self, deadline: tokio::time::Instant) -> Self {
        self.deadline = Some(Box::pin(tokio::time::sleep_until(deadline)));
        self
    }

    fn last_id(&self) -> Option<String> {
        self.last_sent.as_ref().map(|e| e.id.clone())
    }
}

impl Stream for Subscription {
    type Item = Delivery;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            this.finished = true;
            return Poll::Ready(Some(Delivery::Expired {
                last_id: this.last_id(),
            }));
        }
        if let Some(event) = this.replay.next() {
            this.last_sent = Some(Arc::clone(&event));
            return Poll::Ready(Some(Delivery::Event(event)));
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                this.last_sent = Some(Arc::clone(&event));
                Poll::Ready(Some(Delivery::Event(event)))
            }
            // Every sender is gone: the broker dropped this subscriber
            // because it was too slow, or because it is closing.
            Poll::Ready(None) => {
                this.finished = true;
                let last_id = this.last_id();
                Poll::Ready(Some(if this.overflowed.load(Ordering::Acquire) {
                    Delivery::Lagged { last_id }
                } else {
                    Delivery::Closed { last_id }
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
