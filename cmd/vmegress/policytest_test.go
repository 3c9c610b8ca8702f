package main

import (
	"strings"
	"testing"
)

// TestPolicyTestCommand: a correct expectation file passes (exit 0); a
// wrong one exits 1 naming each failed expectation and its rule; an invalid
// one exits 2.
func TestPolicyTestCommand(t *testing.T) {
	const dir = "../../internal/policytest/testdata/"
	if code, out, errOut := runCLI(t, nil, "policy", "test", dir+"good.yaml"); code != 0 || !strings.Contains(out, "10 expectations, 0 failed") {
		t.Errorf("good: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut := runCLI(t, nil, "policy", "test", dir+"good.yaml", dir+"bad.yaml")
	if code != 1 || !strings.Contains(errOut, "bad.yaml:10: project alpha: connect pypi.org:443: want allow, got deny by rule deny/sni:pypi.org") {
		t.Errorf("bad: exit %d\n%s%s", code, out, errOut)
	}
	if code, out, errOut := runCLI(t, nil, "policy", "test", "--json", dir+"bad.yaml"); code != 1 || !strings.Contains(out, `"failed": 2`) {
		t.Errorf("bad --json: exit %d\n%s%s", code, out, errOut)
	}
	if code, _, errOut := runCLI(t, nil, "policy", "test", dir+"config.yaml"); code != 2 || !strings.Contains(errOut, "no expectations") {
		t.Errorf("not an expectation file: exit %d\n%s", code, errOut)
	}
	if code, out, _ := runCLI(t, nil, "policy", "presets", "pypi"); code != 0 || !strings.Contains(out, "- sni:files.pythonhosted.org") {
		t.Errorf("presets pypi: exit %d\n%s", code, out)
	}
	if code, _, errOut := runCLI(t, nil, "policy", "check", dir+"config.yaml"); code != 0 || !strings.Contains(errOut, "DNS exfiltration") {
		t.Errorf("check warns about sni *: exit %d\n%s", code, errOut)
	}
}
