//! End-to-end tests across several silk nodes, compiled as one binary.
