package tlsca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadCreatesOnce(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	ca, err := Load(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, %v", fi, err)
	}
	c := ca.Certificate()
	pub, ok := c.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() || !c.IsCA || !c.MaxPathLenZero {
		t.Errorf("CA certificate: %T IsCA %v", c.PublicKey, c.IsCA)
	}
	again, err := Load(dir, Options{})
	if err != nil || string(again.CertPEM()) != string(ca.CertPEM()) {
		t.Errorf("second load made another CA (%v)", err)
	}
	os.Chmod(filepath.Join(dir, KeyFile), 0o640)
	if _, err := Load(dir, Options{}); err == nil || !strings.Contains(err.Error(), "0640") {
		t.Errorf("group-readable key accepted: %v", err)
	}
	os.Remove(filepath.Join(dir, KeyFile))
	if _, err := Load(dir, Options{}); err == nil || !strings.Contains(err.Error(), "only one of") {
		t.Errorf("certificate without key: %v", err)
	}
}

func TestLeaf(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	clock := func() time.Time { return now }
	ca, err := Load(t.TempDir(), Options{Now: clock})
	if err != nil {
		t.Fatal(err)
	}
	c1, err := ca.Leaf("api.example.com")
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Certificate())
	if _, err := c1.Leaf.Verify(x509.VerifyOptions{DNSName: "api.example.com", Roots: roots, CurrentTime: now}); err != nil {
		t.Errorf("leaf does not verify: %v", err)
	}
	if _, err := c1.Leaf.Verify(x509.VerifyOptions{DNSName: "other.example.com", Roots: roots, CurrentTime: now}); err == nil {
		t.Error("leaf verifies for another name")
	}
	if got := c1.Leaf.NotAfter.Sub(now); got != LeafLifetime {
		t.Errorf("leaf lifetime %v", got)
	}
	if c2, _ := ca.Leaf("api.example.com"); c2 != c1 {
		t.Error("leaf not cached")
	}
	now = now.Add(LeafLifetime - LeafRenew + time.Second)
	if c3, _ := ca.Leaf("api.example.com"); c3 == c1 {
		t.Error("a leaf about to expire was served from the cache")
	}
}
