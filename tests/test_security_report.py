from fedtier.results import security_section


def test_security_section_renders_asr_attack_rejections_and_privacy():
    summary = {
        "arms": {
            "fedavg": {"cda": {"32": 0.9}, "asr": {"32": 0.01, "4": 0.02}},
            "fqbd": {
                "cda": {"32": 0.9},
                "asr": {"32": 0.1, "4": 0.8},
                "attack": {
                    "kind": "fqbd",
                    "malicious": [1, 2],
                    "gamma": 20.0,
                    "attacked_bits": [4],
                    "predicted_bits": [5, 4],
                    "target_bits": [8, 4],
                    "prediction_correct": False,
                },
                "rejections": {
                    "screen": {
                        "rejected_honest": 1.0,
                        "seen_honest": 50.0,
                        "rejected_malicious": 3.0,
                        "seen_malicious": 4.0,
                    }
                },
                "privacy": {
                    "mechanism": "central",
                    "z": 1.0,
                    "q": 0.2,
                    "epsilon": 3.5,
                    "delta": 1e-5,
                    "sampling": "poisson",
                    "edge_rounds": 3,
                },
            },
        }
    }
    text = security_section(summary)
    assert "| 4 | 2.0 | 80.0 |" in text and "| 32 | 1.0 | 10.0 |" in text
    assert "| fqbd | fqbd | 2 | 20 | [4] | [5, 4] | [8, 4] | False |" in text
    assert "| fqbd | screen | 1 / 50 | 3 / 4 |" in text
    assert "| fqbd | central | poisson | 1 | 0.2 | 3 | 3.5 | 1e-05 |" in text
    assert security_section({"arms": {"a": {"cda": {"32": 0.5}}}}) == ""
