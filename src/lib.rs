//! libmirror
