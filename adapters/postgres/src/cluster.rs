//! A private PostgreSQL cluster started from the locally installed server binaries.
//! (Being written.)
