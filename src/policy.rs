//! Path normalisation and the route table.
