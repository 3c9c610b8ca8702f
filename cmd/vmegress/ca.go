package main

import (
	"crypto/x509"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/vmegress/vmegress/internal/config"
	"github.com/vmegress/vmegress/internal/proxy"
	"github.com/vmegress/vmegress/internal/secrets"
	"github.com/vmegress/vmegress/internal/tlsca"
)

// caCmd is `vmegress ca`: the CA that terminating (https) rules show guests.
func (a *app) caCmd() *cobra.Command {
	cc := &cobra.Command{Use: "ca", Short: "The vmegress CA that https rules use to terminate guests' TLS"}
	cc.AddCommand(&cobra.Command{
		Use:   "cert",
		Short: "Print the CA certificate (PEM) for the guest image's trust store; creates the CA in the state directory if there is none",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ca, err := tlsca.Load(a.stateDir, tlsca.Options{})
			if err != nil {
				return err
			}
			_, err = a.stdout.Write(ca.CertPEM())
			return err
		},
	})
	return cc
}

// termination builds the builtin plane's TLS termination for cfg: the CA
// in the state directory (loaded now if a rule terminates, else on first
// use), secrets from credsDir ($CREDENTIALS_DIRECTORY) and secrets_dir,
// checked now, and upstream roots: the host's plus upstream_ca_file.
func (a *app) termination(cfg *config.Config, credsDir string) (*proxy.Termination, error) {
	ca := &tlsca.Lazy{Dir: a.stateDir}
	store := secrets.New(credsDir, cfg.SecretsDir)
	var names []string
	terminates := false
	for _, p := range cfg.Projects {
		names = append(names, p.SecretNames()...)
		for _, r := range p.Allow {
			terminates = terminates || r.Kind == config.KindHTTPS
		}
	}
	if terminates {
		if _, err := ca.CA(); err != nil {
			return nil, err
		}
	}
	if err := store.Check(names); err != nil {
		return nil, fmt.Errorf("checking the secrets inject headers use: %w", err)
	}
	roots, err := x509.SystemCertPool()
	if err != nil || roots == nil {
		roots = x509.NewCertPool()
	}
	if cfg.UpstreamCAFile != "" {
		pem, err := os.ReadFile(cfg.UpstreamCAFile)
		if err != nil {
			return nil, fmt.Errorf("reading upstream_ca_file: %w", err)
		}
		if !roots.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("reading upstream_ca_file %s: no PEM certificate in it", cfg.UpstreamCAFile)
		}
	}
	return &proxy.Termination{Leaf: ca.Leaf, Secret: store.Get, UpstreamRoots: roots}, nil
}
