//! Copy-on-write between the task thread and snapshots: a value owned while no snapshot holds
//! it, so that an access pays no atomic operation, and shared with the snapshots that do, so
//! that taking one copies nothing (the memory backend's key-group maps, the timer index).

use std::sync::Arc;

/// A value the task thread changes and snapshots freeze: `owned` while no snapshot holds it,
/// `shared` (and `owned` empty) while one may.
pub(crate) struct Cow<T> {
    owned: T,
    shared: Option<Arc<T>>,
}

impl<T: Default> Default for Cow<T> {
    fn default() -> Self {
        Self {
            owned: T::default(),
            shared: None,
        }
    }
}

impl<T> std::ops::Deref for Cow<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.shared.as_deref().unwrap_or(&self.owned)
    }
}

impl<T: Clone + Default> Cow<T> {
    /// The value to change: taken back from the snapshots, copied if one still holds it.
    pub fn to_mut(&mut self) -> &mut T {
        if let Some(shared) = self.shared.take() {
            self.owned = Arc::unwrap_or_clone(shared);
        }
        &mut self.owned
    }

    /// The value to change, if `changes` finds something to change in it. It is asked only
    /// while a snapshot may hold the value, so that a shared value is copied only to be
    /// changed; an owned one is handed out without the look.
    pub fn change_if(&mut self, changes: impl FnOnce(&T) -> bool) -> Option<&mut T> {
        if self.shared.as_deref().is_some_and(|shared| !changes(shared)) {
            return None;
        }
        Some(self.to_mut())
    }

    /// The value for a snapshot, which from now on shares it.
    pub fn share(&mut self) -> Arc<T> {
        let owned = &mut self.owned;
        Arc::clone(self.shared.get_or_insert_with(|| Arc::new(std::mem::take(owned))))
    }
}
