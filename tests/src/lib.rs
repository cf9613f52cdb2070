//! Faultline's test harness. (Being written.)
