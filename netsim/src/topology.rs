//! Peer-mesh topologies: complete, random regular, small-world (Watts-Strogatz), scale-free
//! (Barabási-Albert) and explicit edge lists, built as petgraph graphs plus sorted neighbour lists
//! for fast sampling.
//!
//! Every generator draws only from the RNG it is handed, with integer sampling, and walks its
//! state in a fixed order (`Vec`, `BTreeSet`): the same seed gives the same edges on any machine.

use std::collections::BTreeSet;

use petgraph::graph::{NodeIndex, UnGraph};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Most nodes a generated topology may have.
pub const NODES_MAX: u32 = 1_000_000;
/// Most edges a topology may have (a complete graph on 4,096 nodes has about 8.4M).
pub const EDGES_MAX: u64 = 20_000_000;
/// Restarts of the random-regular pairing before giving up.
const REGULAR_RESTARTS_MAX: u32 = 1_000;

/// Why a topology cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("{kind} needs at least {min} nodes, got {n}")]
    TooFewNodes { kind: &'static str, n: u32, min: u32 },
    #[error("{n} nodes is more than the limit of {max}")]
    TooManyNodes { n: u32, max: u32 },
    #[error("{edges} edges is more than the limit of {max}")]
    TooManyEdges { edges: u64, max: u64 },
    #[error("degree {degree} must be at least 1 and below the node count {n}")]
    DegreeOutOfRange { degree: u32, n: u32 },
    #[error("a {degree}-regular graph on {n} nodes needs n * degree even")]
    OddDegreeSum { n: u32, degree: u32 },
    #[error("small-world k = {k} must be even, at least 2 and below the node count {n}")]
    BadLatticeDegree { k: u32, n: u32 },
    #[error("beta_ppm = {beta_ppm} is above 1000000")]
    BetaOutOfRange { beta_ppm: u32 },
    #[error("scale-free m = {m} must be at least 1 and below the node count {n}")]
    BadAttachment { m: u32, n: u32 },
    #[error("edge ({a}, {b}) names a node outside 0..{n}")]
    EdgeOutOfRange { a: u32, b: u32, n: u32 },
    #[error("edge ({node}, {node}) is a self-loop")]
    SelfLoop { node: u32 },
    #[error("edge ({a}, {b}) is listed twice")]
    DuplicateEdge { a: u32, b: u32 },
    #[error("no {degree}-regular graph on {n} nodes found after {attempts} attempts")]
    GenerationFailed { n: u32, degree: u32, attempts: u32 },
}

/// Which topology to build, as a scenario names it (`kind = "random_regular"`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum GraphSpec {
    /// Every node linked to every other.
    Complete,
    /// Every node has exactly `degree` neighbours, uniformly at random.
    RandomRegular { degree: u32 },
    /// Watts-Strogatz: a ring where each node links to its `k` nearest (k even), each link
    /// rewired to a random node with probability `beta_ppm` / 10^6.
    SmallWorld { k: u32, beta_ppm: u32 },
    /// Barabási-Albert: each new node attaches to `m` existing nodes, preferring high degree.
    ScaleFree { m: u32 },
    /// Undirected edges, each listed once.
    Explicit { edges: Vec<(u32, u32)> },
}

impl GraphSpec {
    /// Builds the topology on `n` nodes, drawing from `rng`.
    pub fn build<R: Rng + ?Sized>(&self, n: u32, rng: &mut R) -> Result<Topology, TopologyError> {
        match self {
            GraphSpec::Complete => complete(n),
            GraphSpec::RandomRegular { degree } => random_regular(n, *degree, rng),
            GraphSpec::SmallWorld { k, beta_ppm } => small_world(n, *k, *beta_ppm, rng),
            GraphSpec::ScaleFree { m } => scale_free(n, *m, rng),
            GraphSpec::Explicit { edges } => explicit(n, edges),
        }
    }
}

/// An undirected simple graph on nodes `0..n`.
#[derive(Clone, Debug)]
pub struct Topology {
    /// Node `i` is `NodeIndex::new(i)`; edges were added in sorted order.
    pub graph: UnGraph<(), ()>,
    /// Each node's neighbours, sorted ascending, no duplicates.
    pub neighbors: Vec<Vec<u32>>,
}

impl Topology {
    /// Builds from edges already checked (in range, no loops, no duplicates).
    fn from_edge_set(n: u32, edges: &BTreeSet<(u32, u32)>) -> Result<Self, TopologyError> {
        check_edges_max(edges.len() as u64)?;
        let mut graph = UnGraph::with_capacity(n as usize, edges.len());
        for _ in 0..n {
            graph.add_node(());
        }
        let mut neighbors = vec![Vec::new(); n as usize];
        for &(a, b) in edges {
            graph.add_edge(NodeIndex::new(a as usize), NodeIndex::new(b as usize), ());
            neighbors[a as usize].push(b);
            neighbors[b as usize].push(a);
        }
        for list in &mut neighbors {
            list.sort_unstable();
        }
        Ok(Self { graph, neighbors })
    }

    /// Number of nodes.
    pub fn len(&self) -> u32 {
        self.neighbors.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.neighbors.is_empty()
    }

    /// Number of undirected edges.
    pub fn edge_count(&self) -> usize {
        self.graph.edge_count()
    }

    /// Each node's degree.
    pub fn degrees(&self) -> Vec<u32> {
        self.neighbors.iter().map(|l| l.len() as u32).collect()
    }

    /// Every edge `(a, b)` with `a < b`, sorted.
    pub fn edges(&self) -> Vec<(u32, u32)> {
        let mut out = Vec::with_capacity(self.edge_count());
        for (a, list) in self.neighbors.iter().enumerate() {
            out.extend(list.iter().filter(|&&b| b > a as u32).map(|&b| (a as u32, b)));
        }
        out
    }

    /// One connected component (or none nodes at all).
    pub fn is_connected(&self) -> bool {
        petgraph::algo::connected_components(&self.graph) <= 1
    }

    /// `node`'s neighbours, sorted.
    pub fn neighbors(&self, node: u32) -> &[u32] {
        self.neighbors.get(node as usize).map_or(&[], Vec::as_slice)
    }

    /// Whether the nodes with `keep[node]` are connected through each other alone (true when
    /// fewer than two are kept).
    pub fn is_connected_among(&self, keep: &[bool]) -> bool {
        let kept = |v: u32| keep.get(v as usize).copied().unwrap_or(false);
        let Some(start) = (0..self.len()).find(|&v| kept(v)) else { return true };
        let mut seen = vec![false; self.neighbors.len()];
        seen[start as usize] = true;
        let mut stack = vec![start];
        let mut reached = 1usize;
        while let Some(v) = stack.pop() {
            for &w in &self.neighbors[v as usize] {
                if kept(w) && !seen[w as usize] {
                    seen[w as usize] = true;
                    reached += 1;
                    stack.push(w);
                }
            }
        }
        reached == (0..self.len()).filter(|&v| kept(v)).count()
    }

    /// A uniformly random neighbour of `node`, `None` when it has none.
    pub fn random_neighbor<R: Rng + ?Sized>(&self, node: u32, rng: &mut R) -> Option<u32> {
        let list = self.neighbors.get(node as usize)?;
        if list.is_empty() {
            return None;
        }
        Some(list[rng.random_range(0..list.len())])
    }
}

fn check_nodes(kind: &'static str, n: u32, min: u32) -> Result<(), TopologyError> {
    if n < min {
        return Err(TopologyError::TooFewNodes { kind, n, min });
    }
    if n > NODES_MAX {
        return Err(TopologyError::TooManyNodes { n, max: NODES_MAX });
    }
    Ok(())
}

fn check_edges_max(edges: u64) -> Result<(), TopologyError> {
    if edges > EDGES_MAX {
        return Err(TopologyError::TooManyEdges { edges, max: EDGES_MAX });
    }
    Ok(())
}

fn ordered(a: u32, b: u32) -> (u32, u32) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
}

/// The complete graph on `n >= 1` nodes.
pub fn complete(n: u32) -> Result<Topology, TopologyError> {
    check_nodes("complete", n, 1)?;
    check_edges_max(u64::from(n) * u64::from(n - 1) / 2)?;
    let edges: BTreeSet<(u32, u32)> = (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))).collect();
    Topology::from_edge_set(n, &edges)
}

/// A uniformly chosen simple `degree`-regular graph (Steger-Wormald pairing: random pairs of free
/// stubs are joined when that makes no loop and no double edge; a dead end restarts).
pub fn random_regular<R: Rng + ?Sized>(n: u32, degree: u32, rng: &mut R) -> Result<Topology, TopologyError> {
    check_nodes("random_regular", n, 2)?;
    if degree == 0 || degree >= n {
        return Err(TopologyError::DegreeOutOfRange { degree, n });
    }
    if u64::from(n) * u64::from(degree) % 2 == 1 {
        return Err(TopologyError::OddDegreeSum { n, degree });
    }
    check_edges_max(u64::from(n) * u64::from(degree) / 2)?;
    for _ in 0..REGULAR_RESTARTS_MAX {
        if let Some(edges) = try_regular(n, degree, rng) {
            return Topology::from_edge_set(n, &edges);
        }
    }
    Err(TopologyError::GenerationFailed { n, degree, attempts: REGULAR_RESTARTS_MAX })
}

/// One pairing attempt; `None` on a dead end.
fn try_regular<R: Rng + ?Sized>(n: u32, degree: u32, rng: &mut R) -> Option<BTreeSet<(u32, u32)>> {
    let mut stubs: Vec<u32> = (0..n).flat_map(|v| std::iter::repeat_n(v, degree as usize)).collect();
    let mut edges = BTreeSet::new();
    // Random draws before we look for any suitable pair by scanning (which is rare).
    const DRAWS_MAX: u32 = 64;
    while !stubs.is_empty() {
        let len = stubs.len();
        let mut picked = None;
        for _ in 0..DRAWS_MAX {
            let (i, j) = (rng.random_range(0..len), rng.random_range(0..len));
            let (a, b) = (stubs[i], stubs[j]);
            if a != b && !edges.contains(&ordered(a, b)) {
                picked = Some((i, j));
                break;
            }
        }
        if picked.is_none() {
            // Is any pair suitable at all? If not, this attempt is stuck.
            let free: BTreeSet<u32> = stubs.iter().copied().collect();
            let any = free.iter().any(|&a| free.iter().any(|&b| a < b && !edges.contains(&(a, b))));
            if !any {
                return None;
            }
            continue;
        }
        let (i, j) = picked?;
        edges.insert(ordered(stubs[i], stubs[j]));
        // Remove the higher index first so the lower one stays valid.
        let (hi, lo) = if i > j { (i, j) } else { (j, i) };
        stubs.swap_remove(hi);
        stubs.swap_remove(lo);
    }
    Some(edges)
}

/// Watts-Strogatz: the ring lattice (each node linked to its `k / 2` successors), then each
/// lattice edge `(i, i + j)` rewired, with probability `beta_ppm / 10^6`, to `(i, w)` for a
/// uniform `w` that makes no loop or double edge.
pub fn small_world<R: Rng + ?Sized>(
    n: u32,
    k: u32,
    beta_ppm: u32,
    rng: &mut R,
) -> Result<Topology, TopologyError> {
    check_nodes("small_world", n, 3)?;
    if k < 2 || k % 2 == 1 || k >= n {
        return Err(TopologyError::BadLatticeDegree { k, n });
    }
    if beta_ppm > 1_000_000 {
        return Err(TopologyError::BetaOutOfRange { beta_ppm });
    }
    check_edges_max(u64::from(n) * u64::from(k) / 2)?;
    let mut adj: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); n as usize];
    for i in 0..n {
        for j in 1..=k / 2 {
            let b = (i + j) % n;
            adj[i as usize].insert(b);
            adj[b as usize].insert(i);
        }
    }
    // Rewire lap by lap (j), as in the original paper.
    for j in 1..=k / 2 {
        for i in 0..n {
            let b = (i + j) % n;
            if rng.random_range(0..1_000_000) >= beta_ppm || !adj[i as usize].contains(&b) {
                continue;
            }
            // Node i already linked to everyone: nothing to rewire to.
            if adj[i as usize].len() as u32 >= n - 1 {
                continue;
            }
            let w = loop {
                let w = rng.random_range(0..n);
                if w != i && !adj[i as usize].contains(&w) {
                    break w;
                }
            };
            adj[i as usize].remove(&b);
            adj[b as usize].remove(&i);
            adj[i as usize].insert(w);
            adj[w as usize].insert(i);
        }
    }
    let edges: BTreeSet<(u32, u32)> = adj
        .iter()
        .enumerate()
        .flat_map(|(a, set)| set.iter().filter(move |&&b| b > a as u32).map(move |&b| (a as u32, b)))
        .collect();
    Topology::from_edge_set(n, &edges)
}

/// Barabási-Albert: a complete core of `m + 1` nodes; each later node links to `m` distinct
/// earlier nodes, each drawn with probability proportional to its degree.
pub fn scale_free<R: Rng + ?Sized>(n: u32, m: u32, rng: &mut R) -> Result<Topology, TopologyError> {
    check_nodes("scale_free", n, 2)?;
    if m == 0 || m >= n {
        return Err(TopologyError::BadAttachment { m, n });
    }
    check_edges_max(u64::from(n) * u64::from(m))?;
    let mut edges = BTreeSet::new();
    // Every edge end, once per end: a uniform pick from here is degree-proportional.
    let mut ends: Vec<u32> = Vec::with_capacity(2 * n as usize * m as usize);
    for a in 0..=m {
        for b in a + 1..=m {
            edges.insert((a, b));
            ends.push(a);
            ends.push(b);
        }
    }
    let mut targets = BTreeSet::new();
    for v in m + 1..n {
        targets.clear();
        while (targets.len() as u32) < m {
            targets.insert(ends[rng.random_range(0..ends.len())]);
        }
        for &t in &targets {
            edges.insert((t, v));
            ends.push(t);
            ends.push(v);
        }
    }
    Topology::from_edge_set(n, &edges)
}

/// Exactly the edges listed (each once, either orientation) on nodes `0..n`.
pub fn explicit(n: u32, list: &[(u32, u32)]) -> Result<Topology, TopologyError> {
    check_nodes("explicit", n, 1)?;
    check_edges_max(list.len() as u64)?;
    let mut edges = BTreeSet::new();
    for &(a, b) in list {
        if a >= n || b >= n {
            return Err(TopologyError::EdgeOutOfRange { a, b, n });
        }
        if a == b {
            return Err(TopologyError::SelfLoop { node: a });
        }
        if !edges.insert(ordered(a, b)) {
            return Err(TopologyError::DuplicateEdge { a, b });
        }
    }
    Topology::from_edge_set(n, &edges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;
    use rand_chacha::ChaCha8Rng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn assert_simple(t: &Topology) {
        for (a, list) in t.neighbors.iter().enumerate() {
            assert!(list.windows(2).all(|w| w[0] < w[1]), "node {a}: sorted, no duplicates");
            assert!(!list.contains(&(a as u32)), "node {a}: no self-loop");
            for &b in list {
                assert!(t.neighbors[b as usize].binary_search(&(a as u32)).is_ok(), "symmetric {a}-{b}");
            }
        }
        assert_eq!(t.edges().len(), t.edge_count());
    }

    #[test]
    fn complete_graph_links_everyone() {
        let t = complete(7).unwrap();
        assert_simple(&t);
        assert_eq!(t.edge_count(), 21);
        assert!(t.degrees().iter().all(|&d| d == 6));
        assert!(t.is_connected());
        assert_eq!(complete(1).unwrap().edge_count(), 0);
    }

    #[test]
    fn random_regular_has_its_degree_and_is_connected() {
        for (n, d) in [(10, 3), (100, 4), (1000, 6), (64, 63), (501, 8)] {
            let t = random_regular(n, d, &mut rng(u64::from(n))).unwrap();
            assert_simple(&t);
            assert!(t.degrees().iter().all(|&x| x == d), "n={n} d={d}");
            assert_eq!(t.edge_count() as u32, n * d / 2);
            assert!(t.is_connected(), "n={n} d={d}");
        }
    }

    #[test]
    fn random_regular_rejects_impossible_parameters() {
        assert_eq!(
            random_regular(5, 3, &mut rng(0)).unwrap_err(),
            TopologyError::OddDegreeSum { n: 5, degree: 3 }
        );
        assert_eq!(
            random_regular(4, 4, &mut rng(0)).unwrap_err(),
            TopologyError::DegreeOutOfRange { degree: 4, n: 4 }
        );
        assert_eq!(
            random_regular(4, 0, &mut rng(0)).unwrap_err(),
            TopologyError::DegreeOutOfRange { degree: 0, n: 4 }
        );
        assert!(matches!(random_regular(1, 1, &mut rng(0)), Err(TopologyError::TooFewNodes { .. })));
    }

    #[test]
    fn small_world_keeps_the_edge_count_and_rewires() {
        let lattice = small_world(100, 4, 0, &mut rng(1)).unwrap();
        assert_simple(&lattice);
        assert!(lattice.degrees().iter().all(|&d| d == 4));
        assert!(lattice.neighbors[0] == vec![1, 2, 98, 99]);
        let t = small_world(1000, 6, 100_000, &mut rng(1)).unwrap();
        assert_simple(&t);
        assert_eq!(t.edge_count(), 3000);
        let lattice_edges = t.edges().iter().filter(|&&(a, b)| (b - a) <= 3 || a + 1000 - b <= 3).count();
        // About 10% of the 3000 edges rewired (a few land back on lattice spots).
        let rewired = 3000 - lattice_edges;
        assert!((200..400).contains(&rewired), "{rewired} rewired");
        assert!(t.is_connected());
        assert!(matches!(small_world(10, 3, 0, &mut rng(0)), Err(TopologyError::BadLatticeDegree { .. })));
        assert!(matches!(
            small_world(10, 4, 1_000_001, &mut rng(0)),
            Err(TopologyError::BetaOutOfRange { .. })
        ));
    }

    #[test]
    fn scale_free_has_hubs() {
        let t = scale_free(2000, 3, &mut rng(2)).unwrap();
        assert_simple(&t);
        // m(m+1)/2 core edges, then m per node.
        assert_eq!(t.edge_count(), 6 + 3 * (2000 - 4));
        let degrees = t.degrees();
        assert!(degrees.iter().all(|&d| d >= 3));
        let max = *degrees.iter().max().unwrap();
        assert!(max >= 40, "a hub: max degree {max}");
        assert!(t.is_connected());
        assert!(matches!(scale_free(3, 3, &mut rng(0)), Err(TopologyError::BadAttachment { .. })));
    }

    #[test]
    fn explicit_edges_are_checked() {
        let t = explicit(4, &[(0, 1), (2, 1)]).unwrap();
        assert_eq!(t.edges(), vec![(0, 1), (1, 2)]);
        assert!(!t.is_connected(), "node 3 is alone");
        // A path 0-1-2 with 3 alone: 0 and 2 are connected only through 1.
        let path = explicit(4, &[(0, 1), (1, 2)]).unwrap();
        assert!(path.is_connected_among(&[true, true, true, false]));
        assert!(!path.is_connected_among(&[true, false, true, false]));
        assert!(path.is_connected_among(&[false, false, true, false]));
        assert_eq!(explicit(3, &[(0, 3)]).unwrap_err(), TopologyError::EdgeOutOfRange { a: 0, b: 3, n: 3 });
        assert_eq!(explicit(3, &[(1, 1)]).unwrap_err(), TopologyError::SelfLoop { node: 1 });
        assert_eq!(explicit(3, &[(0, 1), (1, 0)]).unwrap_err(), TopologyError::DuplicateEdge { a: 1, b: 0 });
    }

    #[test]
    fn same_seed_same_edges() {
        let specs = [
            GraphSpec::RandomRegular { degree: 5 },
            GraphSpec::SmallWorld { k: 4, beta_ppm: 200_000 },
            GraphSpec::ScaleFree { m: 2 },
        ];
        for spec in specs {
            let a = spec.build(300, &mut rng(9)).unwrap().edges();
            let b = spec.build(300, &mut rng(9)).unwrap().edges();
            let c = spec.build(300, &mut rng(10)).unwrap().edges();
            assert_eq!(a, b, "{spec:?}");
            assert_ne!(a, c, "{spec:?}: another seed, another graph");
        }
    }

    #[test]
    fn spec_reads_from_toml_and_names_bad_fields() {
        #[derive(Deserialize)]
        struct Wrap {
            graph: GraphSpec,
        }
        let read = |s: &str| toml::from_str::<Wrap>(s).map(|w| w.graph);
        assert_eq!(read("graph = { kind = \"complete\" }").unwrap(), GraphSpec::Complete);
        assert_eq!(
            read("graph = { kind = \"small_world\", k = 4, beta_ppm = 100000 }").unwrap(),
            GraphSpec::SmallWorld { k: 4, beta_ppm: 100_000 }
        );
        assert_eq!(
            read("graph = { kind = \"explicit\", edges = [[0, 1], [1, 2]] }").unwrap(),
            GraphSpec::Explicit { edges: vec![(0, 1), (1, 2)] }
        );
        let err = read("graph = { kind = \"scale_free\", m = 2, extra = 1 }").unwrap_err().to_string();
        assert!(err.contains("extra"), "{err}");
        let err = read("graph = { kind = \"ring\" }").unwrap_err().to_string();
        assert!(err.contains("ring"), "{err}");
    }
}
