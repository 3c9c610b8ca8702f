// Package tlsca is vmegress's certificate authority for TLS termination
// (https rules): one ECDSA P-256 CA created on first use in the state
// directory, and short-lived leaf certificates issued on the fly for the
// names guests connect to, cached per name.
//
// The CA's key is the one secret that lets vmegress (or whoever holds it)
// speak for any name to a guest that trusts the CA: it is written 0600 and
// refused when its file is readable by group or others.
package tlsca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// File names in the state directory.
const (
	CertFile = "ca.pem"
	KeyFile  = "ca-key.pem"
)

// Lifetimes.
const (
	// CALifetime: the guest image carries the CA; ten years spares
	// rebuilding images for it.
	CALifetime = 10 * 365 * 24 * time.Hour
	// LeafLifetime: a leaf that leaks is useful for a day at most.
	LeafLifetime = 24 * time.Hour
	// LeafRenew: a cached leaf with less than this left is issued anew.
	LeafRenew = time.Hour
	// Backdate covers guests whose clock is a little behind the host's.
	Backdate = time.Hour
	// MaxCached bounds the leaf cache (wildcard rules let guests ask for
	// any number of names).
	MaxCached = 4096
)

// CA issues leaf certificates. Create it with Load.
type CA struct {
	cert    *x509.Certificate
	certPEM []byte
	key     *ecdsa.PrivateKey
	now     func() time.Time
	rand    io.Reader

	mu    sync.Mutex
	cache map[string]*tls.Certificate
}

// Options are Load's injected side effects; the zero value uses the clock
// and crypto/rand.
type Options struct {
	Now  func() time.Time
	Rand io.Reader
}

// Load reads the CA from dir, creating it (and dir, 0700) when neither
// file exists. A key file readable by group or others, or one of the two
// files without the other, is an error.
func Load(dir string, opt Options) (*CA, error) {
	if opt.Now == nil {
		opt.Now = time.Now
	}
	if opt.Rand == nil {
		opt.Rand = rand.Reader
	}
	certPath, keyPath := filepath.Join(dir, CertFile), filepath.Join(dir, KeyFile)
	_, cerr := os.Stat(certPath)
	_, kerr := os.Stat(keyPath)
	switch {
	case errors.Is(cerr, os.ErrNotExist) && errors.Is(kerr, os.ErrNotExist):
		if err := create(dir, certPath, keyPath, opt); err != nil {
			return nil, err
		}
	case errors.Is(cerr, os.ErrNotExist) || errors.Is(kerr, os.ErrNotExist):
		return nil, fmt.Errorf("loading the TLS CA: only one of %s and %s exists; remove the other to create a new CA (guests must then trust the new one)", certPath, keyPath)
	}
	return read(certPath, keyPath, opt)
}

func create(dir, certPath, keyPath string, opt Options) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating the TLS CA: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), opt.Rand)
	if err != nil {
		return fmt.Errorf("creating the TLS CA: generating its key: %w", err)
	}
	serial, err := rand.Int(opt.Rand, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		return fmt.Errorf("creating the TLS CA: %w", err)
	}
	host, _ := os.Hostname()
	now := opt.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "vmegress CA " + host, Organization: []string{"vmegress"}},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              now.Add(CALifetime),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true, // it signs leaves only
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(opt.Rand, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("creating the TLS CA: signing its certificate: %w", err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return fmt.Errorf("creating the TLS CA: %w", err)
	}
	// The key first, exclusively: two daemons starting at once never
	// write two different keys under one certificate.
	if err := writeNew(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return fmt.Errorf("creating the TLS CA: %w", err)
	}
	if err := writeNew(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		os.Remove(keyPath)
		return fmt.Errorf("creating the TLS CA: %w", err)
	}
	return nil
}

// writeNew writes a file that must not exist yet, synced, with mode.
func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	return f.Close()
}

func read(certPath, keyPath string, opt Options) (*CA, error) {
	fi, err := os.Stat(keyPath)
	if err != nil {
		return nil, fmt.Errorf("loading the TLS CA: %w", err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("loading the TLS CA: key %s has permissions %#o; it must be 0600 (chmod 600 %s)", keyPath, perm, keyPath)
	}
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, fmt.Errorf("loading the TLS CA: %w", err)
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, fmt.Errorf("loading the TLS CA: %w", err)
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || cb.Type != "CERTIFICATE" || kb == nil {
		return nil, fmt.Errorf("loading the TLS CA: %s or %s is not PEM", certPath, keyPath)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("loading the TLS CA: parsing %s: %w", certPath, err)
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("loading the TLS CA: parsing %s: %w", keyPath, err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("loading the TLS CA: %s is not the key of %s", keyPath, certPath)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("loading the TLS CA: %s is not a CA certificate", certPath)
	}
	return &CA{cert: cert, certPEM: pem.EncodeToMemory(cb), key: key, now: opt.Now, rand: opt.Rand, cache: map[string]*tls.Certificate{}}, nil
}

// CertPEM is the CA certificate, PEM encoded (for the guest's trust store).
func (ca *CA) CertPEM() []byte { return ca.certPEM }

// Certificate is the CA certificate.
func (ca *CA) Certificate() *x509.Certificate { return ca.cert }

// Leaf returns a certificate for name (a host name the policy allowed),
// from the cache while it has more than LeafRenew left.
func (ca *CA) Leaf(name string) (*tls.Certificate, error) {
	now := ca.now()
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if c, ok := ca.cache[name]; ok && c.Leaf.NotAfter.Sub(now) > LeafRenew {
		return c, nil
	}
	c, err := ca.issue(name, now)
	if err != nil {
		return nil, err
	}
	if len(ca.cache) >= MaxCached {
		for n, old := range ca.cache {
			if old.Leaf.NotAfter.Sub(now) <= LeafRenew || len(ca.cache) >= MaxCached {
				delete(ca.cache, n)
			}
		}
	}
	ca.cache[name] = c
	return c, nil
}

func (ca *CA) issue(name string, now time.Time) (*tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), ca.rand)
	if err != nil {
		return nil, fmt.Errorf("issuing a certificate for %s: %w", name, err)
	}
	serial, err := rand.Int(ca.rand, new(big.Int).Lsh(big.NewInt(1), 126))
	if err != nil {
		return nil, fmt.Errorf("issuing a certificate for %s: %w", name, err)
	}
	notAfter := now.Add(LeafLifetime)
	if notAfter.After(ca.cert.NotAfter) {
		notAfter = ca.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    now.Add(-Backdate),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(ca.rand, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("issuing a certificate for %s: %w", name, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("issuing a certificate for %s: %w", name, err)
	}
	return &tls.Certificate{Certificate: [][]byte{der, ca.cert.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

// Lazy loads (or creates) the CA in dir on the first leaf asked for, so a
// host whose rules never terminate TLS never gets a CA key; a failed load
// is tried again on the next call.
type Lazy struct {
	Dir  string
	Opts Options

	mu sync.Mutex
	ca *CA
}

// CA returns the loaded CA, loading it first if needed.
func (l *Lazy) CA() (*CA, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ca == nil {
		ca, err := Load(l.Dir, l.Opts)
		if err != nil {
			return nil, err
		}
		l.ca = ca
	}
	return l.ca, nil
}

// Leaf is CA.Leaf of the loaded CA.
func (l *Lazy) Leaf(name string) (*tls.Certificate, error) {
	ca, err := l.CA()
	if err != nil {
		return nil, err
	}
	return ca.Leaf(name)
}
