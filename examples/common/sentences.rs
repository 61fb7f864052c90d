//! Sentences shared by the MiniLM examples: a small calibration/training set and a held-out set
//! of two paraphrase pairs.
#![allow(dead_code)] // each example uses a subset

pub const CALIBRATION: [&str; 8] = [
    "The weather is lovely today.",
    "He plays the piano every evening.",
    "Quarterly earnings beat analyst expectations.",
    "The recipe calls for two cups of flour.",
    "Neural networks learn representations from data.",
    "She missed the last train home.",
    "The museum opens at nine in the morning.",
    "Prices of electronics keep falling.",
];

pub const HELD_OUT: [&str; 4] = [
    "A man is playing a guitar.",
    "Someone plays an acoustic guitar on stage.",
    "The stock market fell sharply today.",
    "Shares dropped as investors panicked.",
];
