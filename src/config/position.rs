//! Where each key path (`routes[2].stepup.max_age`) sits in the file, as
//! 1-based line and column, from yaml-rust2's marked events over the same
//! text serde read; problems are reported at these positions.

use std::collections::HashMap;

/// Where each key path starts in the file.
pub(super) struct PositionIndex {
    map: HashMap<String, (usize, usize)>,
    /// Where a key path occurs a second time (a duplicated key).
    dups: HashMap<String, (usize, usize)>,
}

impl PositionIndex {
    pub(super) fn build(text: &str) -> PositionIndex {
        use std::collections::hash_map::Entry;
        use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
        use yaml_rust2::scanner::Marker;

        enum Frame {
            Map { path: String, key: Option<String> },
            Seq { path: String, next: usize },
        }
        struct Recv {
            stack: Vec<Frame>,
            map: HashMap<String, (usize, usize)>,
            dups: HashMap<String, (usize, usize)>,
        }
        impl Recv {
            /// Path of the node that starts now, and advance the parent.
            fn child_path(&mut self) -> Option<String> {
                match self.stack.last_mut()? {
                    Frame::Map { path, key } => {
                        let k = key.take()?;
                        Some(join(path, &k))
                    }
                    Frame::Seq { path, next } => {
                        let p = format!("{path}[{next}]");
                        *next += 1;
                        Some(p)
                    }
                }
            }
        }
        fn join(path: &str, key: &str) -> String {
            if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            }
        }
        impl MarkedEventReceiver for Recv {
            fn on_event(&mut self, ev: Event, mark: Marker) {
                let pos = (mark.line(), mark.col() + 1);
                match ev {
                    Event::Scalar(value, ..) => {
                        if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                            if key.is_none() {
                                // A mapping key: remember where the key sits.
                                // A block mapping's start mark is its first
                                // key's `:`; the map starts at the key.
                                if let Some(start) = self.map.get_mut(path.as_str()) {
                                    *start = (*start).min(pos);
                                }
                                let p = join(path, &value);
                                match self.map.entry(p) {
                                    Entry::Occupied(seen) => {
                                        self.dups.entry(seen.key().clone()).or_insert(pos);
                                    }
                                    Entry::Vacant(new) => {
                                        new.insert(pos);
                                    }
                                }
                                *key = Some(value);
                                return;
                            }
                        }
                        if let Some(p) = self.child_path() {
                            self.map.entry(format!("{p}#value")).or_insert(pos);
                            self.map.entry(p).or_insert(pos);
                        }
                    }
                    Event::MappingStart(..) => {
                        let path = if self.stack.is_empty() {
                            String::new()
                        } else {
                            self.child_path().unwrap_or_default()
                        };
                        self.map.entry(path.clone()).or_insert(pos);
                        self.stack.push(Frame::Map { path, key: None });
                    }
                    Event::SequenceStart(..) => {
                        let path = if self.stack.is_empty() {
                            String::new()
                        } else {
                            self.child_path().unwrap_or_default()
                        };
                        self.map.entry(path.clone()).or_insert(pos);
                        self.stack.push(Frame::Seq { path, next: 0 });
                    }
                    Event::MappingEnd | Event::SequenceEnd => {
                        self.stack.pop();
                    }
                    Event::Alias(_) => {
                        self.child_path();
                    }
                    _ => {}
                }
            }
        }
        let mut recv = Recv {
            stack: Vec::new(),
            map: HashMap::new(),
            dups: HashMap::new(),
        };
        // serde_yaml already accepted the text; a failure here only costs
        // positions, never correctness.
        let _ = Parser::new_from_str(text).load(&mut recv, false);
        PositionIndex {
            map: recv.map,
            dups: recv.dups,
        }
    }

    /// Where the key named by serde's "[PATH: ]duplicate field `NAME`"
    /// occurs again (serde_yaml points at the start of the enclosing map).
    pub(super) fn duplicate(&self, message: &str) -> Option<(usize, usize)> {
        let (path, rest) = match message.split_once(": duplicate field `") {
            Some(split) => split,
            None => ("", message.strip_prefix("duplicate field `")?),
        };
        let name = rest.split('`').next()?;
        let key = if path.is_empty() {
            name.to_string()
        } else {
            format!("{path}.{name}")
        };
        self.dups.get(&key).copied()
    }

    /// Position of the value at `path`, else of its key, else of the nearest
    /// ancestor that exists.
    pub(super) fn locate(&self, path: &str) -> (usize, usize) {
        if let Some(p) = self.map.get(&format!("{path}#value")) {
            return *p;
        }
        let mut p = path;
        loop {
            if let Some(pos) = self.map.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.map.get("").copied().unwrap_or((1, 1)),
            }
        }
    }
}
