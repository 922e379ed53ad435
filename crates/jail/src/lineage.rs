//! Fork ancestry of live sandboxes: which runtime keys descend from which, so a
//! parent whose PID namespace nests its children's outlives them (made hollow).

use super::*;

/// Fork ancestry of live sandboxes, by runtime key (the id a sandbox was made with).
///
/// A fork child's PID namespace is nested in its parent's, so the parent's PID 1 must
/// outlive every descendant: a parent destroyed while descendants live is made
/// *hollow* (every process but its agent killed, its resources kept) and released with
/// the last of them.
#[derive(Default)]
pub(crate) struct Lineage {
    pub(crate) nodes: HashMap<String, Node>,
}

pub(crate) struct Node {
    pub(crate) parent: Option<String>,
    /// Host pid of its PID 1.
    pub(crate) agent: Option<i32>,
    pub(crate) live: bool,
    /// Resources of a hollow sandbox, released once no descendant lives.
    pub(crate) hollow: Option<Resources>,
}

impl Lineage {
    pub(crate) fn has_live_descendant(&self, key: &str) -> bool {
        self.nodes.iter().any(|(k, n)| {
            n.live && k != key && {
                let mut up = n.parent.as_deref();
                let mut found = false;
                while let Some(p) = up {
                    if p == key {
                        found = true;
                        break;
                    }
                    up = self.nodes.get(p).and_then(|n| n.parent.as_deref());
                }
                found
            }
        })
    }

    /// Removes `key` and every hollow ancestor left without live descendants; returns
    /// the hollow ancestors' resources for release.
    pub(crate) fn remove_and_collect(&mut self, key: &str) -> Vec<Resources> {
        let mut freed = Vec::new();
        let mut up = self.nodes.remove(key).and_then(|n| n.parent);
        while let Some(p) = up {
            let done = match self.nodes.get(&p) {
                Some(n) => !n.live && !self.has_live_descendant(&p),
                None => false,
            };
            if !done {
                break;
            }
            let Some(node) = self.nodes.remove(&p) else {
                break;
            };
            freed.extend(node.hollow);
            up = node.parent;
        }
        freed
    }

    /// Depth of `key` in its fork tree (0 for a sandbox made from a template).
    pub(crate) fn depth(&self, key: &str) -> usize {
        let mut d = 0;
        let mut up = self.nodes.get(key).and_then(|n| n.parent.as_deref());
        while let Some(p) = up {
            d += 1;
            up = self.nodes.get(p).and_then(|n| n.parent.as_deref());
        }
        d
    }
}

/// Nesting limit of user and PID namespaces is 32 levels; a sandbox uses one and the
/// host's is level 0.
pub(crate) const MAX_FORK_DEPTH: usize = 30;

#[cfg(test)]
mod tests {
    use super::*;

    fn node(parent: Option<&str>, live: bool) -> Node {
        Node {
            parent: parent.map(str::to_owned),
            agent: None,
            live,
            hollow: None,
        }
    }

    /// root → a → b, root → c; root and a destroyed while descendants live (hollow).
    fn tree() -> Lineage {
        let mut l = Lineage::default();
        l.nodes.insert("root".into(), node(None, false));
        l.nodes.insert("a".into(), node(Some("root"), false));
        l.nodes.insert("b".into(), node(Some("a"), true));
        l.nodes.insert("c".into(), node(Some("root"), true));
        l
    }

    #[test]
    fn depth_counts_fork_generations() {
        let l = tree();
        assert_eq!(
            (l.depth("root"), l.depth("a"), l.depth("b"), l.depth("c")),
            (0, 1, 2, 1)
        );
        assert_eq!(l.depth("unknown"), 0);
    }

    #[test]
    fn live_descendants_are_found_at_any_depth() {
        let l = tree();
        assert!(l.has_live_descendant("root"));
        assert!(l.has_live_descendant("a"));
        assert!(
            !l.has_live_descendant("b"),
            "a node is not its own descendant"
        );
        assert!(!l.has_live_descendant("c"));
    }

    #[test]
    fn hollow_ancestors_go_with_their_last_live_descendant() {
        let mut l = tree();
        // b ends: a (hollow, nothing live below) goes too; root stays for c.
        assert!(l.remove_and_collect("b").is_empty());
        let mut left: Vec<&str> = l.nodes.keys().map(String::as_str).collect();
        left.sort();
        assert_eq!(left, ["c", "root"]);
        // c ends: root goes.
        l.remove_and_collect("c");
        assert!(l.nodes.is_empty());
        // A live ancestor is never collected.
        let mut l = tree();
        l.nodes.get_mut("a").unwrap().live = true;
        l.remove_and_collect("b");
        assert!(l.nodes.contains_key("a") && l.nodes.contains_key("root"));
    }
}
