package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
)

// TestCACert: `vmegress ca cert` creates the CA once (key 0600) and prints
// the same certificate every time.
func TestCACert(t *testing.T) {
	dir := t.TempDir()
	var out1, out2, errb bytes.Buffer
	if code := run(context.Background(), []string{"--state-dir", dir, "ca", "cert"}, &out1, &errb); code != exitOK {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	b, _ := pem.Decode(out1.Bytes())
	if b == nil || b.Type != "CERTIFICATE" {
		t.Fatalf("not a PEM certificate: %q", out1.String())
	}
	if c, err := x509.ParseCertificate(b.Bytes); err != nil || !c.IsCA {
		t.Errorf("certificate: %v", err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "ca-key.pem")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v %v", fi, err)
	}
	run(context.Background(), []string{"--state-dir", dir, "ca", "cert"}, &out2, &errb)
	if out1.String() != out2.String() {
		t.Error("a second run printed another CA")
	}
}
